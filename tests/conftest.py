"""Shared fixtures: paths of the repository, its recipes and the optional real-speech sample."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from espnet_plugin.nets import cpu_kernels, scan

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_ASR = REPO / "egs2" / "TEMPLATE" / "asr1" / "asr.sh"
# A user's clone has no ../shared; tests that use it skip when it is absent. A git worktree
# elsewhere points the LIBRISPEECH_MINI environment variable at it.
LIBRISPEECH_MINI = Path(
    os.environ.get("LIBRISPEECH_MINI", REPO.parent / "shared" / "data" / "LibriSpeech-mini")
)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensor operations on a shared 2-core machine: one thread avoids OpenMP threads
    waiting on each other (up to ten times slower under load). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The sampling rate each recipe's asr.sh gives the frontend (its --fs).
RECIPE_RATES = {"librispeech_100": 16000, "asterisk_en": 8000}


@pytest.fixture(scope="session")
def char_token_list(tmp_path_factory) -> Path:
    """An ESPnet token list of 26 letters, for building models from recipe configs."""
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text("\n".join(["<blank>", "<unk>", *"abcdefghijklmnopqrstuvwxyz", "<sos/eos>"]))
    return path


def build_recipe_model(config: Path, rate: int, token_list: Path):
    """The model of a recipe's training config, built by ESPnet's ASRTask as stage 5 does."""
    from espnet2.tasks.asr import ASRTask

    args = ASRTask.get_parser().parse_args(
        ["--config", str(config), "--token_list", str(token_list), "--frontend_conf", f"fs={rate}"]
    )
    torch.manual_seed(0)
    return args, ASRTask.build_model(args)


@pytest.fixture
def librispeech_mini() -> Path:
    if not (LIBRISPEECH_MINI / "LibriSpeech").is_dir():
        pytest.skip(f"no LibriSpeech sample at {LIBRISPEECH_MINI}")
    return LIBRISPEECH_MINI


@pytest.fixture(params=["chunked", "frame_by_frame"])
def scan_path(request, monkeypatch):
    """Run a test through both of _scan's algorithms, whatever the tensor sizes."""
    threshold = 1 if request.param == "frame_by_frame" else 2**62
    monkeypatch.setattr(scan, "SEQUENTIAL_MIN_STATES", threshold)
    return request.param


# The small real-speech recipe, run once per session with the tiny config (test_small_recipe.py and
# test_recipe_stamps.py use it).
ASTERISK = REPO / "egs2" / "asterisk_en" / "asr1"
TINY = "conf/train_asr_tiny.yaml"
ASR_EXP = "exp/asr_train_asr_tiny_raw_en_char_sp"
# A two-epoch model has not learnt to stop: a short beam and output cap keep decoding quick.
FAST_DECODING = "--beam_size 1 --maxlenratio 0.1"
DECODE = "decode_asr_beam_size1_maxlenratio0.1_asr_model_valid.acc.ave"


def stats_dir(recipe: Path) -> Path:
    """The statistics of the small recipe's usual frontend (asr.sh names them after it)."""
    found = sorted(recipe.glob("exp/asr_stats_raw_en_char_sp_*/train/feats_stats.npz"))
    assert len(found) == 1, found
    return found[0].parents[1]


def run_recipe(recipe: Path, *args: str, timeout: int = 1200, check: bool = True):
    """``run.sh *args`` in ``recipe`` with this Python first on PATH; asserts success if ``check``."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "run.sh", *args], cwd=recipe, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (
            f"run.sh {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def copy_recipe(source: Path, target: Path, ignore=("data", "dump", "exp", "downloads")) -> Path:
    """A copy of a recipe folder whose asr.sh and run_study.sh still link to the repository's."""
    shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns(*ignore))
    for script in ("asr.sh", "run_study.sh"):
        (target / script).unlink()
        (target / script).symlink_to(TEMPLATE_ASR.parent / script)
    return target


@pytest.fixture(scope="session")
def recipe(tmp_path_factory, pytestconfig) -> Path:
    """A copy of the small recipe that has run every stage with the tiny config."""
    work = copy_recipe(ASTERISK, tmp_path_factory.mktemp("asterisk_en") / "asr1")
    downloads = pytestconfig.cache.mkdir("asterisk_downloads")
    run_recipe(work, "--asr_config", TINY, "--local_data_opts", f"--download_dir {downloads}",
               "--test_sets", "test", "--inference_args", FAST_DECODING)
    return work


@pytest.fixture
def cpu_kernels_extension():
    """The fused CPU kernels' extension; the test skips, with the reason, where it cannot be built."""
    extension = cpu_kernels.extension()
    if extension is None and os.environ.get("ESPNET_PLUGIN_CPU_KERNELS") == "required":
        pytest.fail("the fused CPU kernels could not be built, and ESPNET_PLUGIN_CPU_KERNELS="
                    "required (CI) says they must be")
    if extension is None:
        pytest.skip("the fused CPU kernels could not be built here (see the warning logged by "
                    "espnet_plugin.nets.cpu_kernels)")
    return extension


@pytest.fixture(params=["cpu_kernels", "pytorch"])
def cpu_path(request, monkeypatch):
    """Run a test through the fused CPU kernels and through the PyTorch fallback, which runs
    wherever the extension is unavailable (as if its build had failed)."""
    if request.param == "cpu_kernels":
        request.getfixturevalue("cpu_kernels_extension")
    else:
        monkeypatch.setattr(cpu_kernels, "extension", lambda: None)
    return request.param
