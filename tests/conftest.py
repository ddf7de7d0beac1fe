"""Shared fixtures: paths of the repository, its recipes and the optional real-speech sample."""

import os
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


@pytest.fixture
def cpu_kernels_extension():
    """The fused CPU kernels' extension; the test skips, with the reason, where it cannot be built."""
    extension = cpu_kernels.extension()
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
