"""benchmark_decoding on the small recipe's trained tiny model and real test prompts: every way
gives ESPnet's tokens; with ``--repeats`` each way's time is the median of its rounds and its
speed-up the median of its ratios to ESPnet's within a round, worked out here from the times it
reports; a bad ``--repeats`` is refused in one line naming it."""

import json

import pytest
import yaml

from conftest import ASR_EXP
from espnet_plugin.benchmarks import decoding
from espnet_plugin.cli import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def arguments(recipe, tmp_path, *extra):
    config = tmp_path / "decode.yaml"
    config.write_text(yaml.safe_dump({"beam_size": 2, "ctc_weight": 0.5, "maxlenratio": 0.3}))
    exp = recipe / ASR_EXP
    return ["--asr_train_config", str(exp / "config.yaml"),
            "--asr_model_file", str(exp / "valid.acc.ave.pth"), "--config", str(config),
            "--wav_scp", str(recipe / "dump/raw/test/wav.scp"),
            "--output_json", str(tmp_path / "decoding.json"), *extra]


def test_rounds_give_median_times_and_paired_speedups(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(recipe)
    report = decoding.main(arguments(recipe, tmp_path, "--batch_sizes", "3", "--repeats", "3"))
    espnet, ours = report["rows"]
    assert espnet["decoder"] == "espnet, one utterance at a time"
    assert ours["decoder"] == "espnet_plugin batched" and ours["batch_size"] == 3
    for r in report["rows"]:
        assert r["identical_to_espnet"] and r["utterances"] == espnet["utterances"] > 1
        low, middle, high = sorted(r["seconds_per_run"])
        assert r["seconds"] == middle
        assert r["utterances_per_second"] == pytest.approx(r["utterances"] / middle)
        ratios = sorted(b / s for b, s in zip(espnet["seconds_per_run"], r["seconds_per_run"]))
        assert r["speedup_over_first_row"] == pytest.approx(ratios[1])
    assert espnet["speedup_over_first_row"] == 1 and report["repeats"] == 3
    assert json.loads((tmp_path / "decoding.json").read_text())["rows"] == report["rows"]


def test_a_bad_repeats_is_named(recipe, tmp_path):
    with pytest.raises(UserError, match="--repeats must be 1 or more, got 0"):
        decoding.main(arguments(recipe, tmp_path, "--repeats", "0"))
    assert not (tmp_path / "decoding.json").exists()
