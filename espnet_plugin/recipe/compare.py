"""Is system B's WER really different from system A's? ``python -m espnet_plugin.recipe.compare``.

Paired bootstrap over utterances (Bisani & Ney, 2004): resample the test set's utterances with
replacement, score both systems on each resample, and read the spread of the difference. On small
test sets a few long utterances can carry a WER difference that another draw of the same speech
would not; the interval says how far the measured difference can be trusted.

Prints both error rates, their difference (B - A, in points), its 95% interval and the share of
resamples in which B is not worse; ``--out_json`` writes the same. The resampling itself needs only
each utterance's error count and reference length, so the report step runs it on score.py's
``utterances.json`` without scoring again.
"""

import argparse
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from espnet_plugin.cli import UserError, run
from espnet_plugin.recipe.kaldi_data import read_text
from espnet_plugin.recipe.score import METRIC, UNITS, UtteranceCounts, score


@dataclass(frozen=True)
class Comparison:
    num_utts: int
    samples: int
    error_rate_a: float
    error_rate_b: float
    difference: float  # B - A, in points
    interval_95: tuple[float, float]
    share_b_not_worse: float  # resamples with B's error rate <= A's

    @property
    def excludes_zero(self) -> bool:
        """The interval lies on one side of 0: the difference is unlikely to be chance."""
        low, high = self.interval_95
        return low > 0 or high < 0


def paired_bootstrap(a: Mapping[str, UtteranceCounts], b: Mapping[str, UtteranceCounts],
                     samples: int = 2000, seed: int = 0) -> Comparison:
    """Resample utterances ``samples`` times; ``a`` and ``b`` score the same references.

    Takes each system's per-utterance counts (``ScoreResult.utterance_counts()`` or score.py's
    utterances.json); the draws follow the utterance ids' sorted order, so the result does not
    depend on the order the files list them in.
    """
    if a.keys() != b.keys():
        raise UserError("both systems must be scored on the same utterances")
    if samples < 1:
        raise UserError(f"samples must be >= 1, got {samples}")
    utt_ids = sorted(a)
    differing = [u for u in utt_ids if a[u].ref_len != b[u].ref_len]
    if differing:
        raise UserError(f"utterance '{differing[0]}' has references of different lengths: both "
                        "systems must be scored against the same references")
    errors_a = np.array([a[u].errors for u in utt_ids])
    errors_b = np.array([b[u].errors for u in utt_ids])
    ref_lens = np.array([a[u].ref_len for u in utt_ids])
    if ref_lens.sum() == 0:
        raise UserError("the references are all empty: the error rates are undefined")
    draws = np.random.default_rng(seed).integers(0, len(ref_lens), size=(samples, len(ref_lens)))
    words = np.maximum(ref_lens[draws].sum(1), 1)  # a draw of empty references only: no words
    rate_a = 100.0 * errors_a[draws].sum(1) / words
    rate_b = 100.0 * errors_b[draws].sum(1) / words
    low, high = np.percentile(rate_b - rate_a, [2.5, 97.5])
    error_rate_a = 100.0 * errors_a.sum() / ref_lens.sum()
    error_rate_b = 100.0 * errors_b.sum() / ref_lens.sum()
    return Comparison(
        num_utts=len(utt_ids),
        samples=samples,
        error_rate_a=float(error_rate_a),
        error_rate_b=float(error_rate_b),
        difference=float(error_rate_b - error_rate_a),
        interval_95=(float(low), float(high)),
        share_b_not_worse=float(np.mean(rate_b <= rate_a)),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m espnet_plugin.recipe.compare",
        description="Paired bootstrap of the WER/CER difference between two systems' hypotheses.",
    )
    parser.add_argument("--ref", required=True, help="reference text: utt_id transcript...")
    parser.add_argument("--hyp_a", required=True, help="system A's hypothesis text (the baseline)")
    parser.add_argument("--hyp_b", required=True, help="system B's hypothesis text")
    parser.add_argument("--unit", choices=UNITS, default="word", help="word -> WER, char -> CER")
    parser.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    parser.add_argument("--out_json", help="also write the comparison here")
    args = parser.parse_args(argv)
    ref = read_text(args.ref)
    a, b = (score(ref, read_text(hyp), args.unit, ref_label=f"reference {args.ref}",
                  hyp_label=f"hypothesis {hyp}") for hyp in (args.hyp_a, args.hyp_b))
    comparison = paired_bootstrap(a.utterance_counts(), b.utterance_counts(), args.samples,
                                  args.seed)
    metric = METRIC[args.unit]
    low, high = comparison.interval_95
    print(f"{metric} A {comparison.error_rate_a:.1f}  B {comparison.error_rate_b:.1f}  "
          f"B - A {comparison.difference:+.1f} points, 95% interval [{low:+.1f}, {high:+.1f}] "
          f"({comparison.num_utts} utterances, {comparison.samples} resamples); "
          f"B not worse in {100 * comparison.share_b_not_worse:.1f}% of them")
    if args.out_json:
        record = {"unit": args.unit, **asdict(comparison)}
        Path(args.out_json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    run(main)
