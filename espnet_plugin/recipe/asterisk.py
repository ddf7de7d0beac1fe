"""Asterisk's English telephone prompts as a tiny real-speech corpus: data/{train,dev,test}.

Debian ships about 570 prompts read by one speaker (Allison, 8 kHz) in
``asterisk-core-sounds-en-wav`` and their transcripts in ``asterisk-core-sounds-en``, so
``apt-get download`` gives a real ASR corpus without root, an account or a large download: a
smoke test of the whole recipe that trains in minutes. Transcripts are normalised the LibriSpeech
way; prompts that are not plain words (``[tones]``, digits, symbols) are left out.

``--lm_text`` also writes English text for a language model from Debian's fortune databases
(``fortunes``, ``fortunes-min``): their sentences normalised like the transcripts, those that are
not plain words left out.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import re
import shutil
import subprocess
from pathlib import Path

from espnet_plugin.cli import UserError, run
from espnet_plugin.recipe.kaldi_data import (
    DataDir,
    add_overwrite_option,
    audio_info,
    write_data_dir,
)

PACKAGES = ("asterisk-core-sounds-en-wav", "asterisk-core-sounds-en")
TRANSCRIPTS = Path("usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
SOUNDS = Path("usr/share/asterisk/sounds/en_US_f_Allison")
LM_PACKAGES = ("fortunes", "fortunes-min")
FORTUNES = Path("usr/share/games/fortunes")
SPEAKER = "allison"
# Split of a prompt: hash bucket (0-99) below the bound.
SPLIT_BOUNDS = (("train", 80), ("dev", 90), ("test", 100))

_EDGE_PUNCTUATION = ".,!?:;\"'"
_WORD = re.compile(r"[A-Z]+(?:'[A-Z]+)*")


def find_debs(folder: Path, packages: tuple[str, ...] = PACKAGES) -> list[Path] | None:
    """The package files in ``folder``, or None when one is absent."""
    debs = []
    for package in packages:
        found = sorted(folder.glob(f"{package}_*.deb"))
        if len(found) > 1:
            raise UserError(f"several {package} packages in {folder}: keep one of {found}")
        if not found:
            return None
        debs.append(found[0])
    return debs


def fetch_debs(download_dir: Path, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """The packages in ``download_dir``, fetched with ``apt-get download`` unless already there."""
    debs = find_debs(download_dir, packages)
    if debs is not None:
        logging.info(f"reusing {', '.join(map(str, debs))}")
        return debs
    download_dir.mkdir(parents=True, exist_ok=True)
    command = ["apt-get", "download", *packages]
    try:
        result = subprocess.run(command, cwd=download_dir, capture_output=True, text=True)
        problem = result.stderr.strip() or f"exit status {result.returncode}"
    except FileNotFoundError:
        problem = "apt-get is not installed"
    debs = find_debs(download_dir, packages)
    if debs is None:
        raise UserError(
            f"`{' '.join(command)}` failed in {download_dir}: {problem}\n"
            "Run `apt-get update` (as root) so apt knows these packages, or put their .deb "
            "files (e.g. from packages.debian.org) into that folder (for the prompts, --deb_dir "
            "DIR names another folder)."
        )
    return debs


def extract(debs: list[Path], tree: Path, needed: tuple[Path, ...] = (TRANSCRIPTS, SOUNDS)) -> Path:
    """Unpack the packages into ``tree`` (reused when it already holds the ``needed`` paths)."""
    if all((tree / path).exists() for path in needed):
        logging.info(f"reusing {tree}")
        return tree
    scratch = tree.with_name(tree.name + ".partial")
    if scratch.exists():
        shutil.rmtree(scratch)  # left by an interrupted extraction of ours
    scratch.mkdir(parents=True)
    for deb in debs:
        try:
            subprocess.run(
                ["dpkg-deb", "-x", str(deb), str(scratch)],
                check=True,
                capture_output=True,
                text=True,
            )
        except FileNotFoundError as err:
            raise UserError(
                "dpkg-deb is not installed; it is needed to unpack .deb files"
            ) from err
        except subprocess.CalledProcessError as err:
            raise UserError(f"dpkg-deb -x {deb} failed: {err.stderr.strip()}") from err
    for path in needed:
        if not (scratch / path).exists():
            raise UserError(f"{path} is not in {', '.join(map(str, debs))}")
    if tree.exists():
        shutil.rmtree(tree)  # an incomplete earlier extraction (checked above)
    scratch.rename(tree)
    return tree


def parse_prompts(path: Path) -> dict[str, str]:
    """``name: transcript`` lines of the gzipped prompt list; ``;`` starts a comment line."""
    prompts: dict[str, str] = {}
    line_of: dict[str, int] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.startswith(";"):
                continue
            name, colon, transcript = line.partition(":")
            name = name.strip()
            if not colon or not name or any(c.isspace() for c in name):
                raise UserError(f"{path}:{lineno}: expected 'name: transcript', got {line!r}")
            if name in prompts:
                raise UserError(
                    f"{path}:{lineno}: prompt '{name}' is listed twice (first on line "
                    f"{line_of[name]})"
                )
            prompts[name], line_of[name] = transcript.strip(), lineno
    return prompts


def normalize_transcript(transcript: str) -> str | None:
    """LibriSpeech-style words (upper case, no punctuation but in-word apostrophes, hyphens
    split), or None when the prompt is not plain words: ``[tones]``, ``press 5``, ``#``, ``H.323``.
    """
    words = []
    for token in transcript.replace("-", " ").split():
        word = token.strip(_EDGE_PUNCTUATION).upper()
        if not word:
            continue  # a lone "..." or quote
        if not _WORD.fullmatch(word):
            return None
        words.append(word)
    return " ".join(words) or None


def split_of(name: str) -> str:
    """train/dev/test by a stable hash of the prompt name: independent of the other prompts."""
    bucket = int(hashlib.sha256(name.encode("utf-8")).hexdigest(), 16) % 100
    return next(split for split, bound in SPLIT_BOUNDS if bucket < bound)


def prepare_splits(tree: Path) -> dict[str, tuple[DataDir, float]]:
    """Split -> (its data dir, its total seconds) from an extracted package tree."""
    prompts = parse_prompts(tree / TRANSCRIPTS)
    splits = {split: DataDir(wav_scp={}, text={}, utt2spk={}) for split, _ in SPLIT_BOUNDS}
    seconds = dict.fromkeys(splits, 0.0)
    ids: dict[str, str] = {}
    not_words, no_audio = [], []
    for name, transcript in sorted(prompts.items()):
        words = normalize_transcript(transcript)
        audio = tree / SOUNDS / f"{name}.wav"
        if words is None:
            not_words.append(name)
            continue
        if not audio.is_file():
            no_audio.append(name)
            continue
        info = audio_info(audio, f"prompt '{name}'")
        utt = f"{SPEAKER}-{name.replace('/', '-')}"
        if utt in ids:
            raise UserError(f"prompts '{ids[utt]}' and '{name}' map to the same id '{utt}'")
        ids[utt] = name
        split = split_of(name)
        data = splits[split]
        data.wav_scp[utt], data.text[utt], data.utt2spk[utt] = str(audio.resolve()), words, SPEAKER
        seconds[split] += info.frames / info.samplerate
    logging.info(f"left out {len(not_words)} prompts that are not plain words: {not_words}")
    logging.info(f"left out {len(no_audio)} prompts with no audio: {no_audio}")
    for split, data in splits.items():
        if not data.wav_scp:
            raise UserError(
                f"{tree / TRANSCRIPTS}: no usable prompt falls into split '{split}'"
            )
    return {split: (data, seconds[split]) for split, data in splits.items()}


def prepare(
    data_dir: Path, download_dir: Path, deb_dir: Path | None = None, overwrite: bool = False
) -> dict[str, tuple[int, float]]:
    """Fetch, unpack and write ``data_dir/{train,dev,test}``; returns split -> (utts, seconds)."""
    if deb_dir is None:
        debs = fetch_debs(download_dir)
    else:
        debs = find_debs(deb_dir)
        if debs is None:
            raise UserError(
                f"--deb_dir {deb_dir} must hold {PACKAGES[0]}_*.deb and {PACKAGES[1]}_*.deb"
            )
    splits = prepare_splits(extract(debs, download_dir / "extracted"))
    for split, (data, _) in splits.items():
        write_data_dir(data, data_dir / split, overwrite=overwrite)
    summary = {split: (len(data.wav_scp), secs) for split, (data, secs) in splits.items()}
    print(f"{'split':<6} {'utterances':>10} {'seconds':>8}")
    for split, (count, secs) in summary.items():
        print(f"{split:<6} {count:>10} {secs:>8.1f}")
    return summary


def fortune_sentences(tree: Path) -> list[str]:
    """The fortunes' sentences as plain words, each once, in their order."""
    sentences = {}
    for path in sorted((tree / FORTUNES).iterdir()):
        if path.suffix or not path.is_file():  # .dat indexes, .u8 duplicates
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for fortune in re.split(r"^%$", text, flags=re.M):
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(fortune.split())):
                words = normalize_transcript(sentence)
                if words is not None and len(words.split()) >= 2:
                    sentences.setdefault(words, None)
    return list(sentences)


def prepare_lm_text(download_dir: Path, out: Path) -> int:
    """Write the fortunes' sentences to ``out``, one per line; returns how many."""
    debs = fetch_debs(download_dir / "lm", LM_PACKAGES)
    tree = extract(debs, download_dir / "lm" / "extracted", (FORTUNES,))
    sentences = fortune_sentences(tree)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    logging.info(f"wrote {out}: {len(sentences)} sentences from {', '.join(LM_PACKAGES)}")
    return len(sentences)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", type=Path, default=Path("data"))
    parser.add_argument(
        "--download_dir",
        type=Path,
        default=Path("downloads"),
        help="where the .deb files and their extracted tree are kept",
    )
    parser.add_argument(
        "--deb_dir",
        type=Path,
        default=None,
        help="use the two .deb files in this folder instead of apt-get download",
    )
    parser.add_argument(
        "--lm_text",
        type=Path,
        default=None,
        help="also write LM text here: the sentences of Debian's fortune databases",
    )
    add_overwrite_option(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    prepare(args.data_dir, args.download_dir, args.deb_dir, args.overwrite)
    if args.lm_text is not None:
        prepare_lm_text(args.download_dir, args.lm_text)


if __name__ == "__main__":
    run(main)
