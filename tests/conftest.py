"""Shared fixtures: paths of the repository, its recipes and the optional real-speech sample."""

import os
from pathlib import Path

import pytest

from espnet_plugin.nets import scan

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_ASR = REPO / "egs2" / "TEMPLATE" / "asr1" / "asr.sh"
# A user's clone has no ../shared; tests that use it skip when it is absent. A git worktree
# elsewhere points the LIBRISPEECH_MINI environment variable at it.
LIBRISPEECH_MINI = Path(
    os.environ.get("LIBRISPEECH_MINI", REPO.parent / "shared" / "data" / "LibriSpeech-mini")
)


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
