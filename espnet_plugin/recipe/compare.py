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


def _arrays(systems: list[Mapping[str, UtteranceCounts]]) -> tuple[list[str], np.ndarray,
                                                                      np.ndarray]:
    """Utterance ids (sorted), each system's errors per utterance (systems x utterances) and the
    reference lengths; all systems must score the same references."""
    first = systems[0]
    if any(counts.keys() != first.keys() for counts in systems):
        raise UserError("both systems must be scored on the same utterances")
    utt_ids = sorted(first)
    differing = [u for u in utt_ids if any(c[u].ref_len != first[u].ref_len for c in systems)]
    if differing:
        raise UserError(f"utterance '{differing[0]}' has references of different lengths: both "
                        "systems must be scored against the same references")
    ref_lens = np.array([first[u].ref_len for u in utt_ids])
    if ref_lens.sum() == 0:
        raise UserError("the references are all empty: the error rates are undefined")
    errors = np.array([[counts[u].errors for u in utt_ids] for counts in systems], dtype=float)
    return utt_ids, errors, ref_lens


def utterance_draws(num_utts: int, samples: int, seed: int) -> np.ndarray:
    """The resamples of the utterances: ``samples`` rows of utterance indices."""
    if samples < 1:
        raise UserError(f"samples must be >= 1, got {samples}")
    return np.random.default_rng(seed).integers(0, num_utts, size=(samples, num_utts))


def draw_rates(errors: np.ndarray, ref_lens: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Error rate (%) of each system (rows of ``errors``) on each resample: systems x samples."""
    words = np.maximum(ref_lens[draws].sum(1), 1)  # a draw of empty references only: no words
    return 100.0 * errors[:, draws].sum(-1) / words


def paired_bootstrap(a: Mapping[str, UtteranceCounts], b: Mapping[str, UtteranceCounts],
                     samples: int = 2000, seed: int = 0) -> Comparison:
    """Resample utterances ``samples`` times; ``a`` and ``b`` score the same references.

    Takes each system's per-utterance counts (``ScoreResult.utterance_counts()`` or score.py's
    utterances.json); the draws follow the utterance ids' sorted order, so the result does not
    depend on the order the files list them in.
    """
    utt_ids, errors, ref_lens = _arrays([a, b])
    rate_a, rate_b = draw_rates(errors, ref_lens, utterance_draws(len(utt_ids), samples, seed))
    error_rate_a, error_rate_b = 100.0 * errors.sum(1) / ref_lens.sum()
    return Comparison(**_summary(len(utt_ids), error_rate_a, error_rate_b, rate_a, rate_b))


def _summary(num_utts: int, error_rate_a, error_rate_b, rate_a: np.ndarray,
             rate_b: np.ndarray) -> dict:
    """What every comparison reports: the error rates, B - A and the bootstrap's interval of it
    (``rate_a``, ``rate_b``: the resampled error rates)."""
    low, high = np.percentile(rate_b - rate_a, [2.5, 97.5])
    return dict(num_utts=num_utts, samples=len(rate_a), error_rate_a=float(error_rate_a),
                error_rate_b=float(error_rate_b), difference=float(error_rate_b - error_rate_a),
                interval_95=(float(low), float(high)),
                share_b_not_worse=float(np.mean(rate_b <= rate_a)))


@dataclass(frozen=True)
class PooledComparison(Comparison):
    """A comparison of two models trained with several seeds each, pooled over the seeds."""

    seeds_a: int = 1
    seeds_b: int = 1
    utterance_interval_95: tuple[float, float] = (0.0, 0.0)  # of the seed-averaged errors
    seed_share: float = 0.0  # of the pooled difference's variance, due to the seeds' spread


def pooled_bootstrap(a: list[Mapping[str, UtteranceCounts]], b: list[Mapping[str, UtteranceCounts]],
                     samples: int = 2000, seed: int = 0) -> PooledComparison:
    """The paired bootstrap of two models given one score per seed, pooled over the seeds.

    Each resample draws the utterances (the draws of :func:`paired_bootstrap`) and, within each
    model, its seeds with replacement; B - A is the difference of the drawn seeds' mean error
    rates. Error rates are the seeds' means. Beside the interval: the utterance-only bootstrap of
    the seed-averaged errors on the same draws, and ``seed_share``, 1 - its variance over the
    pooled one's (0 where the seeds agree): how much of the interval the seeds' spread makes.
    """
    if not a or not b:
        raise UserError("each model needs the score of at least one seed")
    utt_ids, errors, ref_lens = _arrays([*a, *b])
    draws = utterance_draws(len(utt_ids), samples, seed)
    rates = draw_rates(errors, ref_lens, draws)  # (seeds of A + seeds of B) x samples
    seeds = np.random.default_rng([seed, 1])

    def pooled(rows: np.ndarray) -> np.ndarray:
        picked = seeds.integers(0, len(rows), size=(samples, len(rows)))
        return rows[picked, np.arange(samples)[:, None]].mean(1)

    rate_a, rate_b = pooled(rates[:len(a)]), pooled(rates[len(a):])
    mean_a, mean_b = rates[:len(a)].mean(0), rates[len(a):].mean(0)  # seed-averaged errors
    pooled_var, utterance_var = np.var(rate_b - rate_a), np.var(mean_b - mean_a)
    error_rate = 100.0 * errors.sum(1) / ref_lens.sum()
    error_rate_a, error_rate_b = error_rate[:len(a)].mean(), error_rate[len(a):].mean()
    return PooledComparison(
        **_summary(len(utt_ids), error_rate_a, error_rate_b, rate_a, rate_b),
        seeds_a=len(a),
        seeds_b=len(b),
        utterance_interval_95=tuple(float(x) for x in np.percentile(mean_b - mean_a, [2.5, 97.5])),
        seed_share=float(max(0.0, 1 - utterance_var / pooled_var)) if pooled_var > 0 else 0.0,
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
