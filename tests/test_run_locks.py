"""One run at a time writes each output: a second asr.sh run that would write what a running one
writes stops at once, naming it (pid, start time, command); the first ends as if it ran alone,
and a run killed with SIGKILL leaves no lock behind that blocks the next."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TEMPLATE_ASR
from dataprep_helpers import REPO, write_tone

SETS = {"train": 12, "dev": 4, "test": 4}
STAGE_2 = ["--stage", "2", "--stop_stage", "2", "--train_set", "train", "--valid_set", "dev",
           "--test_sets", "test", "--fs", "8k", "--nj", "1", "--min_wav_duration", "0.1"]


def make_recipe(folder: Path) -> Path:
    """A recipe folder with data/{train,dev,test} of tones, a 16 kHz one among them (to resample)."""
    for dset, count in SETS.items():
        utts = [f"spk-{dset}{i:02d}" for i in range(count)]
        data = folder / "data" / dset
        data.mkdir(parents=True)
        for i, utt in enumerate(utts):
            write_tone(folder / "audio" / f"{utt}.wav", 0.5 + 0.1 * i, 16000 if i == 0 else 8000)
        (data / "wav.scp").write_text("".join(f"{u} {folder}/audio/{u}.wav\n" for u in utts))
        (data / "text").write_text("".join(f"{u} A TONE\n" for u in utts))
        (data / "utt2spk").write_text("".join(f"{u} spk\n" for u in utts))
        (data / "spk2utt").write_text(f"spk {' '.join(utts)}\n")
    return folder


def start(recipe: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(["bash", str(TEMPLATE_ASR), "--python", sys.executable, *args],
                            cwd=recipe, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_lock(recipe: Path, process: subprocess.Popen) -> str:
    """The holder line of data set train's lock once ``process`` has written it."""
    lock = recipe / "exp" / "locks" / "data_train.lock"
    for _ in range(600):
        if lock.exists() and f"pid {process.pid}," in lock.read_text():
            return lock.read_text().strip()
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{lock} never named pid {process.pid}")


def outputs(recipe: Path) -> dict[str, str]:
    return {str(p.relative_to(recipe)): p.read_text() for p in sorted(recipe.glob("dump/raw/*/*"))
            if p.is_file() and p.name != ".stamp"}


def test_a_second_run_stops_at_once_naming_the_first(tmp_path):
    recipe = make_recipe(tmp_path / "twice")
    first = start(recipe, *STAGE_2)
    holder = wait_for_lock(recipe, first)
    began = time.time()
    second = start(recipe, *STAGE_2)
    _, error = second.communicate(timeout=60)
    assert second.returncode == 1 and time.time() - began < 30
    assert "ERROR: another run is writing data set train (data/ and dump/raw/) (data/train; " \
           f"lock exp/locks/data_train.lock): {holder}." in error
    assert f"pid {first.pid}, started 20" in holder and "command: " in holder
    assert " --stage 2 --stop_stage 2 " in holder
    out, error = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:] + error[-2000:]
    # The outputs are those of one run alone, and they are up to date.
    alone = make_recipe(tmp_path / "alone")
    out, error = start(alone, *STAGE_2).communicate(timeout=600)
    assert outputs(recipe) == {
        name: content.replace(str(alone), str(recipe)) for name, content in outputs(alone).items()
    }
    assert "dump/raw/test/converted" in outputs(recipe)
    rerun = start(recipe, *STAGE_2)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and out.count(": up to date") == 3, out


def test_a_killed_run_leaves_no_lock_that_blocks(tmp_path):
    recipe = make_recipe(tmp_path / "killed")
    killed = start(recipe, *STAGE_2)
    wait_for_lock(recipe, killed)
    os.killpg(killed.pid, signal.SIGKILL)  # the run and the programs it started, as a scheduler kills
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    rerun = start(recipe, *STAGE_2)
    out, error = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-2000:] + error[-2000:]
    assert f"pid {rerun.pid}," in (recipe / "exp" / "locks" / "data_train.lock").read_text()


def test_runs_writing_other_outputs_go_on_side_by_side(tmp_path):
    """What run_study.sh --jobs N does: one run per experiment; a run of stages 5-10 takes no data
    set's lock, so it never waits for, nor stops, the formatting of data."""
    recipe = make_recipe(tmp_path / "disjoint")
    formatting = start(recipe, *STAGE_2)
    wait_for_lock(recipe, formatting)
    decoding = start(recipe, *STAGE_2[2:], "--stage", "8", "--stop_stage", "8", "--asr_tag", "x")
    _, error = decoding.communicate(timeout=60)
    assert "missing exp/asr_x/config.yaml: it is made by stage 5" in error  # not a lock
    assert "another run" not in error
    assert formatting.wait(timeout=600) == 0
