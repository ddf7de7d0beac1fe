"""The recipe never reports a stale result: each stage's output records what it was made from and
is made again, saying why, when that changes; a training from other inputs is refused, not mixed;
checks that need no stage run before stage 1. Each scenario runs asr.sh on a copy of the small
recipe the session already ran (data, a tiny model, its decodes)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
import yaml

from conftest import (
    ASR_EXP,
    ASTERISK,
    DECODE,
    FAST_DECODING,
    TINY,
    copy_recipe,
    run_recipe,
    stats_dir,
)
from espnet_plugin.recipe.stamp import file_hash


@pytest.fixture
def work(recipe, tmp_path):
    """A private copy of the finished small recipe, outputs included."""
    return copy_recipe(recipe, tmp_path / "asr1", ignore=())


def stamp_of(path):
    return json.loads((path / ".stamp").read_text())


def test_a_retrained_model_is_decoded_again(work):
    """The averaged model changes (as a longer retraining makes it): stage 8 decodes again and
    stage 9 scores the new hypotheses, instead of "already decoded"."""
    exp = work / ASR_EXP
    decoded = exp / DECODE / "test"
    before = (decoded / "text").read_text()
    old_stamp = stamp_of(decoded)
    model = torch.load(exp / "valid.acc.ave.pth")
    torch.save({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in model.items()}, exp / "valid.acc.ave.pth")
    result = run_recipe(work, "--asr_config", TINY, "--stage", "8", "--stop_stage", "9",
                        "--test_sets", "test", "--inference_args", FAST_DECODING)
    assert f"{ASR_EXP}/{DECODE}/test: its inputs changed since it was made" in result.stdout
    assert f"file {ASR_EXP}/valid.acc.ave.pth: content" in result.stdout
    new_stamp = stamp_of(decoded)
    assert new_stamp != old_stamp
    assert new_stamp["files"][f"{ASR_EXP}/valid.acc.ave.pth"] == file_hash(exp / "valid.acc.ave.pth")
    assert stamp_of(decoded / "score_word")["files"][f"{ASR_EXP}/{DECODE}/test/text"] == \
        file_hash(decoded / "text")
    assert (decoded / "text").read_text() != before or "score_word: its inputs changed" in result.stdout
    again = run_recipe(work, "--asr_config", TINY, "--stage", "8", "--stop_stage", "9",
                       "--test_sets", "test", "--inference_args", FAST_DECODING)
    assert f"{DECODE}/test: up to date" in again.stdout


def test_other_decoding_options_get_their_own_decode_dir(work):
    result = run_recipe(work, "--asr_config", TINY, "--stage", "8", "--stop_stage", "9",
                        "--test_sets", "test", "--inference_args", "--beam_size 1 --maxlenratio 0.05")
    assert (work / ASR_EXP / "decode_asr_beam_size1_maxlenratio0.05_asr_model_valid.acc.ave"
            / "test" / "score_word" / "result.json").is_file()
    assert (work / ASR_EXP / DECODE / "test" / "text").is_file()  # the other one is kept
    assert "up to date" not in result.stdout.split("Stage 8")[1].split("Stage 9")[0]


def test_a_changed_duration_filter_formats_the_training_set_again(work):
    kept = (work / "dump/raw/train_sp/utt2num_samples").read_text().splitlines()
    assert any(int(line.split()[1]) > 3 * 8000 for line in kept)
    result = run_recipe(work, "--asr_config", TINY, "--stage", "2", "--stop_stage", "2",
                        "--max_wav_duration", "3")
    assert "dump/raw/train_sp: its inputs changed since it was made" in result.stdout
    assert "--max_dur 20" in result.stdout and "--max_dur 3" in result.stdout
    lengths = [int(line.split()[1]) for line in
               (work / "dump/raw/train_sp/utt2num_samples").read_text().splitlines()]
    assert lengths and max(lengths) <= 3 * 8000
    assert "dump/raw/test: up to date" in result.stdout


def test_each_frontend_gets_its_own_statistics(work):
    """Other mel bands (or hop, or window): statistics of their own, the others kept; a config
    changed in place is not trained on with the model begun from the old one."""
    stats = stats_dir(work)
    (work / "conf" / "tiny_copy.yaml").write_text((work / TINY).read_text())
    same = run_recipe(work, "--asr_config", "conf/tiny_copy.yaml", "--stage", "4",
                      "--stop_stage", "4")
    assert f"{stats.relative_to(work)}: up to date" in same.stdout  # another config, same frontend
    config = yaml.safe_load((work / TINY).read_text())
    config["frontend_conf"]["n_mels"] = 30
    (work / "conf" / "tiny_30mels.yaml").write_text(yaml.safe_dump(config))
    result = run_recipe(work, "--asr_config", "conf/tiny_30mels.yaml", "--stage", "4",
                        "--stop_stage", "4")
    assert f"{stats.relative_to(work)}: up to date" not in result.stdout
    made = sorted(work.glob("exp/asr_stats_raw_en_char_sp_*/train/feats_stats.npz"))
    assert len(made) == 2
    shapes = sorted(np.load(path)["sum"].shape for path in made)
    assert shapes == [(30,), (40,)]
    # The tiny config itself edited in place (another hop): new statistics, and the model
    # trained from the old config and statistics is not resumed with the new ones.
    config = yaml.safe_load((work / TINY).read_text())
    config["frontend_conf"]["hop_length"] = 100
    (work / TINY).write_text(yaml.safe_dump(config))
    refused = run_recipe(work, "--asr_config", TINY, "--stage", "4", "--stop_stage", "5",
                         check=False)
    assert refused.returncode != 0
    assert f"{ASR_EXP} was trained from other inputs" in refused.stderr
    assert f"file {TINY}: content" in refused.stderr and "--overwrite true" in refused.stderr
    assert len(list(work.glob("exp/asr_stats_raw_en_char_sp_*/train/feats_stats.npz"))) == 3


def test_a_training_from_other_options_is_refused_not_mixed(work):
    checkpoint = (work / ASR_EXP / "checkpoint.pth").read_bytes()
    result = run_recipe(work, "--asr_config", TINY, "--stage", "5", "--stop_stage", "9",
                        "--asr_args", "--max_epoch 3", check=False)
    assert result.returncode != 0
    assert "option asr_args: '' -> '--max_epoch 3'" in result.stderr
    assert "another --asr_tag" in result.stderr and "--overwrite true" in result.stderr
    assert (work / ASR_EXP / "checkpoint.pth").read_bytes() == checkpoint


def test_overwrite_is_an_option_and_redoes_what_it_is_asked_to(work):
    result = run_recipe(work, "--asr_config", TINY, "--stage", "3", "--stop_stage", "3",
                        "--overwrite", "true")
    assert "data/en_token_list/char: making it again (--overwrite true)" in result.stdout
    unchanged = run_recipe(work, "--asr_config", TINY, "--stage", "3", "--stop_stage", "3")
    assert "data/en_token_list/char: up to date" in unchanged.stdout


def test_a_missing_lm_config_is_found_before_stage_1(tmp_path):
    """Found before data preparation (hours before stage 6), not after training."""
    bare = copy_recipe(ASTERISK, tmp_path / "bare")  # nothing run: stage 1 would download
    result = run_recipe(bare, "--asr_config", TINY, "--use_lm", "true", check=False)
    assert result.returncode != 0
    assert "--use_lm true needs --lm_config" in result.stderr
    assert "Stage 1" not in result.stdout


def test_decoding_errors_name_the_utterance_and_file(work, tmp_path):
    """A file gone or emptied after formatting: the decoder names the utterance and the path."""
    exp = work / ASR_EXP
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, "float32"), 8000)
    for key, path in (("gone", tmp_path / "gone.wav"), ("silent", empty)):
        scp = tmp_path / f"{key}.scp"
        scp.write_text(f"{key} {path}\n")
        result = subprocess.run(
            [sys.executable, "-m", "espnet_plugin.bin.asr_inference", "--output_dir",
             str(tmp_path / f"out_{key}"), "--data_path_and_name_and_type",
             f"{scp},speech,sound", "--asr_train_config", str(exp / "config.yaml"),
             "--asr_model_file", str(exp / "valid.acc.ave.pth"), "--beam_size", "1"],
            cwd=work, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode != 0
        assert f"utterance '{key}'" in result.stderr and str(path) in result.stderr, \
            result.stderr[-2000:]


def test_a_dry_run_says_what_would_be_made_and_makes_nothing(work):
    common = ["--asr_config", TINY, "--test_sets", "test", "--inference_args", FAST_DECODING,
              "--dry_run", "true"]
    done = run_recipe(work, "--stage", "2", "--stop_stage", "10", *common)
    assert "Dry run: 0 output(s) to make or redo" in done.stdout, done.stdout[-3000:]
    before = (work / "dump/raw/train_sp/utt2num_samples").read_bytes()
    stale = run_recipe(work, "--stage", "2", "--stop_stage", "10", *common,
                       "--max_wav_duration", "3", check=False)
    assert "(dry run) would make dump/raw/train_sp" in stale.stdout
    assert re.search(r"Dry run: [1-9]\d* output\(s\) to make or redo", stale.stdout) \
        or "was trained from other inputs" in stale.stderr
    assert (work / "dump/raw/train_sp/utt2num_samples").read_bytes() == before
