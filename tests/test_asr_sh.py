"""The stage driver's own checks: options, stage numbers and missing inputs fail with clear errors
before anything runs, and nothing already produced is removed."""

import subprocess
from pathlib import Path

import pytest

from conftest import TEMPLATE_ASR

SETS = ["--train_set", "train", "--valid_set", "dev", "--test_sets", "test"]


def run_asr_sh(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TEMPLATE_ASR), *args], cwd=recipe, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("stage", ["0", "14", "42", "three"])
def test_unknown_stage_is_refused(tmp_path, stage):
    result = run_asr_sh(tmp_path, "--stage", stage, *SETS)
    assert result.returncode != 0
    assert f"unknown --stage {stage}: stages are 1..13" in result.stderr


def test_unknown_option_is_refused(tmp_path):
    result = run_asr_sh(tmp_path, "--nbep", "100", *SETS)
    assert result.returncode != 0
    assert "unknown option --nbep" in result.stderr


def test_missing_sets_are_named(tmp_path):
    result = run_asr_sh(tmp_path, "--stage", "2")
    assert result.returncode != 0
    assert "--train_set, --valid_set and --test_sets are required" in result.stderr


def test_stage_refuses_to_start_without_its_inputs(tmp_path):
    """Stage 3 needs stage 2's text: the error names the file and the stage that makes it."""
    result = run_asr_sh(tmp_path, "--stage", "3", "--stop_stage", "3", *SETS)
    assert result.returncode != 0
    assert "missing dump/raw/train/text: it is made by stage 2 (formatting)" in result.stderr


def test_missing_data_script_is_named(tmp_path):
    result = run_asr_sh(tmp_path, "--stage", "1", "--stop_stage", "1", *SETS)
    assert result.returncode != 0
    assert "missing local/data.sh" in result.stderr


def test_decoding_refuses_without_a_model_and_keeps_existing_results(tmp_path):
    """A failed re-run never deletes what an earlier run produced."""
    decode = tmp_path / "exp" / "asr_x" / "decode_asr_model_valid.acc.ave" / "test"
    decode.mkdir(parents=True)
    (decode / "text").write_text("utt1 HELLO\n")
    result = run_asr_sh(tmp_path, "--stage", "8", "--stop_stage", "8", "--asr_tag", "x", *SETS)
    assert result.returncode != 0
    assert "missing exp/asr_x/config.yaml: it is made by stage 5 (training)" in result.stderr
    assert (decode / "text").read_text() == "utt1 HELLO\n"


def test_help_lists_stages_and_options(tmp_path):
    result = run_asr_sh(tmp_path, "--help")
    assert result.returncode == 0
    assert "9  scoring" in result.stdout and "--inference_nj" in result.stdout
