"""Real audio files and corpus layouts written into tmp_path for the data-preparation tests."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile

REPO = Path(__file__).resolve().parents[1]


def find_shared(relative: str) -> Path | None:
    """``shared/<relative>`` beside the checkout or an ancestor of it; None in users' clones."""
    for base in REPO.parents:
        candidate = base / "shared" / relative
        if candidate.exists():
            return candidate
    return None


def write_tone(path: Path, seconds: float, rate: int = 16000, freq: float = 440.0) -> int:
    """A sine tone at half scale, format from the suffix; returns its number of samples."""
    num_samples = round(seconds * rate)
    t = np.arange(num_samples) / rate
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, 0.5 * np.sin(2 * np.pi * freq * t), rate, subtype="PCM_16")
    return num_samples


def make_librispeech(parent: Path, split: str, utterances: dict[str, tuple[str, float]]) -> Path:
    """``parent/LibriSpeech/<split>`` with FLAC audio and per-chapter transcripts.

    ``utterances`` maps ``<speaker>-<chapter>-<n>`` to (transcript line text, seconds).
    """
    split_dir = parent / "LibriSpeech" / split
    transcripts: dict[Path, list[str]] = {}
    for utt, (words, seconds) in sorted(utterances.items()):
        speaker, chapter, _ = utt.split("-")
        chapter_dir = split_dir / speaker / chapter
        write_tone(chapter_dir / f"{utt}.flac", seconds)
        transcripts.setdefault(chapter_dir / f"{speaker}-{chapter}.trans.txt", []).append(
            f"{utt} {words}"
        )
    for trans, lines in transcripts.items():
        trans.write_text("".join(line + "\n" for line in lines))
    return split_dir


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Content and modification time of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_recipe_script(script: str, args: list, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``egs2/<script>`` with this Python first on PATH and this checkout importable."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        ["bash", REPO / "egs2" / script, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
