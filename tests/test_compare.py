"""espnet_plugin.recipe.compare: the paired bootstrap against hand-enumerated resampling distributions."""

import json

import pytest

from espnet_plugin.cli import UserError
from espnet_plugin.recipe.compare import main, paired_bootstrap
from espnet_plugin.recipe.score import score

# u1: 4 words, A right, B two words wrong; u2: 2 words, both one wrong. A resample of two
# utterances is (u1, u1) with probability 1/4: B - A = 4 errors / 8 words = +50 points;
# (u2, u2) 1/4: 0 / 4 = 0; mixed 1/2: 2 / 6 = +33.3 points.
REF = {"u1": "one two three four", "u2": "five six"}
HYP_A = {"u1": "one two three four", "u2": "five sex"}
HYP_B = {"u1": "one too three for", "u2": "five sex"}


def test_interval_and_share_match_the_enumerated_distribution():
    result = paired_bootstrap(score(REF, HYP_A), score(REF, HYP_B), samples=20000, seed=1)
    assert result.error_rate_a == pytest.approx(100 / 6)
    assert result.error_rate_b == pytest.approx(300 / 6)
    assert result.difference == pytest.approx(200 / 6)
    assert result.interval_95 == pytest.approx((0.0, 50.0))
    assert result.share_b_not_worse == pytest.approx(0.25, abs=0.015)  # only (u2, u2) ties


def test_identical_systems_differ_by_nothing():
    a = score(REF, HYP_B)
    result = paired_bootstrap(a, score(REF, dict(HYP_B)), samples=500)
    assert result.difference == 0 and result.interval_95 == (0.0, 0.0)
    assert result.share_b_not_worse == 1.0


def test_a_system_better_on_every_utterance_is_never_worse():
    ref = {f"u{i}": "a b c d" for i in range(10)}
    worse = {key: "a x c d" for key in ref}
    result = paired_bootstrap(score(ref, worse), score(ref, ref), samples=500)
    assert result.interval_95 == (-25.0, -25.0) and result.share_b_not_worse == 1.0


def test_systems_scored_on_other_utterances_are_refused():
    with pytest.raises(ValueError, match="same utterances"):
        paired_bootstrap(score(REF, HYP_A), score({"u1": "one"}, {"u1": "one"}))


def test_cli_prints_and_writes_json(tmp_path, capsys):
    files = {}
    for name, texts in (("ref", REF), ("a", HYP_A), ("b", HYP_B)):
        files[name] = tmp_path / name
        files[name].write_text("".join(f"{k} {v}\n" for k, v in texts.items()))
    out = tmp_path / "cmp.json"
    main(["--ref", str(files["ref"]), "--hyp_a", str(files["a"]), "--hyp_b", str(files["b"]),
          "--samples", "4000", "--out_json", str(out)])
    assert "WER A 16.7  B 50.0  B - A +33.3 points, 95% interval [+0.0, +50.0]" in capsys.readouterr().out
    assert json.loads(out.read_text())["num_utts"] == 2


def test_cli_names_a_hypothesis_that_lacks_utterances(tmp_path):
    ref, hyp = tmp_path / "ref", tmp_path / "hyp"
    ref.write_text("u1 a b\nu2 c\n")
    hyp.write_text("u1 a b\n")
    with pytest.raises(UserError, match=f"hypothesis {hyp} lacks 1 of the 2"):
        main(["--ref", str(ref), "--hyp_a", str(ref), "--hyp_b", str(hyp)])
