"""espnet_plugin.recipe.compare: the paired bootstrap against hand-enumerated resampling
distributions."""

import json

import pytest

from espnet_plugin.cli import UserError
from espnet_plugin.recipe.compare import main, paired_bootstrap, pooled_bootstrap
from espnet_plugin.recipe.score import UtteranceCounts, score

# u1: 4 words, A right, B two words wrong; u2: 2 words, both one wrong. A resample of two
# utterances is (u1, u1) with probability 1/4: B - A = 4 errors / 8 words = +50 points;
# (u2, u2) 1/4: 0 / 4 = 0; mixed 1/2: 2 / 6 = +33.3 points.
REF = {"u1": "one two three four", "u2": "five six"}
HYP_A = {"u1": "one two three four", "u2": "five sex"}
HYP_B = {"u1": "one too three for", "u2": "five sex"}


def counts(ref, hyp):
    return score(ref, hyp).utterance_counts()


def test_interval_and_share_match_the_enumerated_distribution():
    result = paired_bootstrap(counts(REF, HYP_A), counts(REF, HYP_B), samples=20000, seed=1)
    assert result.error_rate_a == pytest.approx(100 / 6)
    assert result.error_rate_b == pytest.approx(300 / 6)
    assert result.difference == pytest.approx(200 / 6)
    assert result.interval_95 == pytest.approx((0.0, 50.0))
    assert result.share_b_not_worse == pytest.approx(0.25, abs=0.015)  # only (u2, u2) ties


def test_identical_systems_differ_by_nothing():
    result = paired_bootstrap(counts(REF, HYP_B), counts(REF, dict(HYP_B)), samples=500)
    assert result.difference == 0 and result.interval_95 == (0.0, 0.0)
    assert result.share_b_not_worse == 1.0 and not result.excludes_zero


def test_a_system_better_on_every_utterance_is_never_worse():
    ref = {f"u{i}": "a b c d" for i in range(10)}
    worse = {key: "a x c d" for key in ref}
    result = paired_bootstrap(counts(ref, worse), counts(ref, ref), samples=500)
    assert result.interval_95 == (-25.0, -25.0) and result.share_b_not_worse == 1.0
    assert result.excludes_zero


def test_systems_scored_on_other_utterances_are_refused():
    with pytest.raises(UserError, match="same utterances"):
        paired_bootstrap(counts(REF, HYP_A), counts({"u1": "one"}, {"u1": "one"}))
    other_reference = {**counts(REF, HYP_A), "u2": UtteranceCounts(errors=1, ref_len=3)}
    with pytest.raises(UserError, match="'u2' has references of different lengths"):
        paired_bootstrap(counts(REF, HYP_A), other_reference)


def test_the_order_utterances_are_listed_in_does_not_matter():
    ref = {f"u{i}": "a b c d" for i in range(20)}
    hyp = {key: "a x c d" if i % 3 else "a b c" for i, key in enumerate(ref)}
    a, b = counts(ref, ref), counts(ref, hyp)
    reversed_b = dict(reversed(list(b.items())))
    assert paired_bootstrap(a, b, samples=300) == paired_bootstrap(a, reversed_b, samples=300)


def test_cli_prints_and_writes_json(tmp_path, capsys):
    files = {}
    for name, texts in (("ref", REF), ("a", HYP_A), ("b", HYP_B)):
        files[name] = tmp_path / name
        files[name].write_text("".join(f"{k} {v}\n" for k, v in texts.items()))
    out = tmp_path / "cmp.json"
    main(["--ref", str(files["ref"]), "--hyp_a", str(files["a"]), "--hyp_b", str(files["b"]),
          "--samples", "4000", "--out_json", str(out)])
    assert "WER A 16.7  B 50.0  B - A +33.3 points, 95% interval [+0.0, +50.0]" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert (written["unit"], written["num_utts"], written["samples"]) == ("word", 2, 4000)


def test_cli_names_a_hypothesis_that_lacks_utterances(tmp_path):
    ref, hyp = tmp_path / "ref", tmp_path / "hyp"
    ref.write_text("u1 a b\nu2 c\n")
    hyp.write_text("u1 a b\n")
    with pytest.raises(UserError, match=f"hypothesis {hyp} lacks 1 of the 2"):
        main(["--ref", str(ref), "--hyp_a", str(ref), "--hyp_b", str(hyp)])


def given(**errors):
    """Utterance counts from errors per utterance; u1 has 4 reference words, u2 has 2."""
    return {u: UtteranceCounts(e, {"u1": 4, "u2": 2}[u]) for u, e in errors.items()}


def test_pooled_error_rates_are_the_seeds_means():
    # A: seed 0 1/6 = 16.7 %, seed 1 3/6 = 50 %; B (one seed): 50 %.
    result = pooled_bootstrap([given(u1=0, u2=1), given(u1=2, u2=1)], [given(u1=2, u2=1)],
                              samples=500)
    assert (result.seeds_a, result.seeds_b) == (2, 1)
    assert result.error_rate_a == pytest.approx(100 / 3)
    assert result.difference == pytest.approx(50 - 100 / 3)


def test_one_seed_each_is_the_paired_bootstrap():
    a, b = counts(REF, HYP_A), counts(REF, HYP_B)
    pooled, paired = pooled_bootstrap([a], [b], samples=3000, seed=4), paired_bootstrap(
        a, b, samples=3000, seed=4)
    assert pooled.interval_95 == paired.interval_95
    assert pooled.share_b_not_worse == paired.share_b_not_worse
    assert pooled.seed_share == 0


def test_seeds_that_agree_add_nothing_to_the_interval():
    a, b = counts(REF, HYP_A), counts(REF, HYP_B)
    pooled = pooled_bootstrap([a, a, a], [b, b], samples=3000, seed=2)
    assert pooled.interval_95 == paired_bootstrap(a, b, samples=3000, seed=2).interval_95
    assert pooled.utterance_interval_95 == pooled.interval_95
    assert pooled.seed_share == 0


def test_seed_spread_widens_the_interval_by_hand():
    # One utterance of one word: A's seeds 0 and 1 errors, B's none. Drawing A's two seeds gives
    # its mean 0, 50 or 100 % (1/4, 1/2, 1/4): B - A in [-100, 0]; the seed-averaged errors give
    # -50 on every resample, so the whole variance is the seeds'.
    one = {"u": UtteranceCounts(0, 1)}
    wrong = {"u": UtteranceCounts(1, 1)}
    pooled = pooled_bootstrap([one, wrong], [one], samples=4000, seed=0)
    assert pooled.difference == pytest.approx(-50)
    assert pooled.interval_95 == pytest.approx((-100, 0))
    assert pooled.utterance_interval_95 == pytest.approx((-50, -50))
    assert pooled.seed_share == pytest.approx(1)
    assert pooled.share_b_not_worse == 1


def test_pooled_needs_a_seed_and_the_same_utterances():
    with pytest.raises(UserError, match="at least one seed"):
        pooled_bootstrap([], [given(u1=0)])
    with pytest.raises(UserError, match="same utterances"):
        pooled_bootstrap([given(u1=0)], [given(u1=0), given(u2=0)])
