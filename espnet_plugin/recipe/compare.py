"""Is system B's WER really different from system A's? ``python -m espnet_plugin.recipe.compare``.

Paired bootstrap over utterances (Bisani & Ney, 2004): resample the test set's utterances with
replacement, score both systems on each resample, and read the spread of the difference. On small
test sets a few long utterances can carry a WER difference that another draw of the same speech
would not; the interval says how far the measured difference can be trusted.

Prints both error rates, their difference (B - A, in points), its 95% interval and the share of
resamples in which B is not worse; ``--out_json`` writes the same.
"""

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from espnet_plugin.cli import UserError, run
from espnet_plugin.recipe.kaldi_data import read_text
from espnet_plugin.recipe.score import METRIC, UNITS, ScoreResult, score


@dataclass(frozen=True)
class Comparison:
    unit: str
    num_utts: int
    samples: int
    error_rate_a: float
    error_rate_b: float
    difference: float  # B - A, in points
    interval_95: tuple[float, float]
    share_b_not_worse: float  # resamples with B's error rate <= A's


def paired_bootstrap(a: ScoreResult, b: ScoreResult, samples: int = 2000,
                     seed: int = 0) -> Comparison:
    """Resample utterances ``samples`` times; ``a`` and ``b`` score the same references."""
    if [u.utt_id for u in a.utterances] != [u.utt_id for u in b.utterances]:
        raise UserError("both systems must be scored on the same utterances, in the same order")
    if samples < 1:
        raise UserError(f"samples must be >= 1, got {samples}")
    errors_a = np.array([u.errors for u in a.utterances])
    errors_b = np.array([u.errors for u in b.utterances])
    ref_lens = np.array([u.ref_len for u in a.utterances])
    draws = np.random.default_rng(seed).integers(0, len(ref_lens), size=(samples, len(ref_lens)))
    words = np.maximum(ref_lens[draws].sum(1), 1)  # a draw of empty references only: no words
    rate_a = 100.0 * errors_a[draws].sum(1) / words
    rate_b = 100.0 * errors_b[draws].sum(1) / words
    low, high = np.percentile(rate_b - rate_a, [2.5, 97.5])
    return Comparison(
        unit=a.unit,
        num_utts=a.num_utts,
        samples=samples,
        error_rate_a=a.error_rate,
        error_rate_b=b.error_rate,
        difference=b.error_rate - a.error_rate,
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
    comparison = paired_bootstrap(a, b, args.samples, args.seed)
    metric = METRIC[args.unit]
    low, high = comparison.interval_95
    print(f"{metric} A {comparison.error_rate_a:.1f}  B {comparison.error_rate_b:.1f}  "
          f"B - A {comparison.difference:+.1f} points, 95% interval [{low:+.1f}, {high:+.1f}] "
          f"({comparison.num_utts} utterances, {comparison.samples} resamples); "
          f"B not worse in {100 * comparison.share_b_not_worse:.1f}% of them")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(asdict(comparison), indent=2) + "\n",
                                       encoding="utf-8")


if __name__ == "__main__":
    run(main)
