"""LibriSpeech -> Kaldi data dirs: one ``<data_dir>/<split>`` per corpus split, ``-`` -> ``_``.

Reads the extracted corpus as openslr ships it,
``LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac`` with one
``<speaker>-<chapter>.trans.txt`` per chapter. ``wav.scp`` points at the FLAC files themselves:
ESPnet2's sound loader reads FLAC, so no conversion copy is needed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tarfile
import urllib.request
from pathlib import Path

from espnet_plugin.cli import UserError, run
from espnet_plugin.recipe.kaldi_data import (
    DataDir,
    add_overwrite_option,
    audio_info,
    combine,
    write_data_dir,
)

SPLITS = (
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
)
OPENSLR_URL = "https://www.openslr.org/resources/12"
LM_URL = "https://www.openslr.org/resources/11"  # the LM corpus
LM_CORPUS = "librispeech-lm-norm.txt.gz"


def corpus_root(librispeech_dir: Path) -> Path:
    """The ``LibriSpeech`` folder: ``DIR/LibriSpeech``, or ``DIR`` when it is that folder."""
    nested = librispeech_dir / "LibriSpeech"
    if nested.is_dir() or librispeech_dir.name != "LibriSpeech":
        return nested
    return librispeech_dir


def find_split(librispeech_dir: Path, split: str) -> Path:
    if not librispeech_dir.is_dir():
        raise UserError(
            f"--librispeech_dir {librispeech_dir} does not exist; give the folder that holds "
            "LibriSpeech/<split>/ (or pass --download to fetch the corpus there)"
        )
    split_dir = corpus_root(librispeech_dir) / split
    if not split_dir.is_dir():
        raise UserError(
            f"LibriSpeech split '{split}' not found: looked for {split_dir} "
            f"(--librispeech_dir {librispeech_dir}); pass --download to fetch it from openslr"
        )
    return split_dir


def prepare_split(split_dir: Path) -> DataDir:
    """Tables of one split, checking every transcript line against its audio file."""
    wav_scp, text, utt2spk = {}, {}, {}
    chapters = sorted(p for p in split_dir.glob("*/*") if p.is_dir())
    if not chapters:
        raise UserError(f"{split_dir} has no <speaker>/<chapter> folders")
    for chapter_dir in chapters:
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name
        trans = chapter_dir / f"{speaker}-{chapter}.trans.txt"
        if not trans.is_file():
            raise UserError(f"{chapter_dir}: transcript file {trans.name} is missing")
        for lineno, line in enumerate(trans.read_text("utf-8").splitlines(), 1):
            where = f"{trans}:{lineno}"
            utt, _, words = line.strip().partition(" ")
            words = " ".join(words.split())
            if not utt:
                raise UserError(f"{where}: empty line")
            if not words:
                raise UserError(f"{where}: utterance '{utt}' has an empty transcript")
            if not utt.startswith(f"{speaker}-"):
                raise UserError(
                    f"{where}: utterance id '{utt}' does not start with its speaker '{speaker}-'"
                )
            if utt in text:
                raise UserError(f"{where}: utterance '{utt}' appears twice in {split_dir}")
            audio = chapter_dir / f"{utt}.flac"
            if not audio.is_file():
                raise UserError(
                    f"{where}: transcript line for '{utt}' has no audio file: {audio} is missing"
                )
            audio_info(audio, where)
            wav_scp[utt], text[utt], utt2spk[utt] = str(audio.resolve()), words, speaker
    return DataDir(wav_scp=wav_scp, text=text, utt2spk=utt2spk)


def download(url: str, target: Path) -> Path:
    """Fetch ``url`` into ``target`` (through a partial file), or reuse ``target`` if there."""
    if target.is_file():
        logging.info(f"reusing {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    logging.info(f"downloading {url} -> {target}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as err:  # urllib.error.URLError, timeouts, refused connections
        raise UserError(
            f"cannot download {url}: {getattr(err, 'reason', err)}; check the network "
            f"connection, or fetch the file by hand into {target.parent}"
        ) from err
    partial.rename(target)
    return target


def download_split(split: str, librispeech_dir: Path, download_dir: Path, url_base: str) -> None:
    """Fetch ``<split>.tar.gz`` (kept for re-runs) and extract the split next to the others.

    Extraction goes through a scratch folder so that an interrupted run never leaves a partial
    split that a later run would mistake for a complete one.
    """
    if split not in SPLITS:
        raise UserError(f"--splits: '{split}' is not a LibriSpeech split ({', '.join(SPLITS)})")
    archive = download(f"{url_base.rstrip('/')}/{split}.tar.gz", download_dir / f"{split}.tar.gz")
    root = corpus_root(librispeech_dir)
    scratch = root.parent / f".{split}.extracting"
    if scratch.exists():
        shutil.rmtree(scratch)  # left by an interrupted extraction of ours
    logging.info(f"extracting {archive}")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(scratch, filter="data")
    extracted = scratch / "LibriSpeech"
    if not (extracted / split).is_dir():
        raise UserError(f"{archive} holds no LibriSpeech/{split}; is it the right archive?")
    root.mkdir(parents=True, exist_ok=True)
    for item in extracted.iterdir():  # the split and the corpus-level README/SPEAKERS files
        if not (root / item.name).exists():
            item.rename(root / item.name)
    shutil.rmtree(scratch)


def prepare(
    librispeech_dir: Path,
    data_dir: Path,
    splits: list[str],
    download: bool = False,
    download_dir: Path | None = None,
    url_base: str = OPENSLR_URL,
    overwrite: bool = False,
    combined: dict[str, list[str]] | None = None,
) -> dict[str, Path]:
    """Write ``data_dir/<split>`` for each split and each combined set (e.g. dev = dev-clean +
    dev-other, ESPnet's LibriSpeech validation set); returns split or set name -> data dir.
    """
    prepared = {}
    for split in splits:
        if download and not (corpus_root(librispeech_dir) / split).is_dir():
            download_split(split, librispeech_dir, download_dir or librispeech_dir, url_base)
        prepared[split] = prepare_split(find_split(librispeech_dir, split))
    for name, parts in (combined or {}).items():
        unknown = [part for part in parts if part not in splits]
        if name in prepared or unknown:
            raise UserError(
                f"--combine {name}={','.join(parts)}: the name must be new and the parts among "
                f"--splits {' '.join(splits)}"
            )
        prepared[name] = combine([prepared[part] for part in parts], data_dir / name)
    written = {}
    for name, data in prepared.items():
        written[name] = data_dir / name.replace("-", "_")
        write_data_dir(data, written[name], overwrite=overwrite)
    return written


def parse_combination(spec: str) -> tuple[str, list[str]]:
    """``dev=dev-clean,dev-other`` -> ("dev", ["dev-clean", "dev-other"])."""
    name, equals, parts = spec.partition("=")
    if not equals or not name or not parts:
        raise argparse.ArgumentTypeError(f"expected NAME=SPLIT,SPLIT..., got {spec!r}")
    return name, parts.split(",")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--librispeech_dir",
        type=Path,
        required=True,
        help="folder holding LibriSpeech/<split>/ (or LibriSpeech/ itself)",
    )
    parser.add_argument("--data_dir", type=Path, default=Path("data"))
    parser.add_argument("--splits", nargs="+", default=["dev-clean", "test-clean"])
    parser.add_argument(
        "--combine",
        type=parse_combination,
        nargs="*",
        default=[],
        help="also write unions of splits, e.g. dev=dev-clean,dev-other (the last --combine "
        "counts: an empty one writes none)",
    )
    parser.add_argument(
        "--download", action="store_true", help="fetch missing splits from openslr (resource 12)"
    )
    parser.add_argument(
        "--download_dir",
        type=Path,
        default=None,
        help="where downloaded archives are kept (default: --librispeech_dir)",
    )
    parser.add_argument("--url_base", default=OPENSLR_URL)
    parser.add_argument(
        "--lm_corpus",
        action="store_true",
        help=f"also fetch the LibriSpeech LM corpus (openslr resource 11, {LM_CORPUS}, about "
        "1.4 GB) into --download_dir, for stage 6's --lm_train_text",
    )
    parser.add_argument("--lm_url_base", default=LM_URL)
    add_overwrite_option(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    if args.lm_corpus:
        corpus = download(f"{args.lm_url_base.rstrip('/')}/{LM_CORPUS}",
                          (args.download_dir or args.librispeech_dir) / LM_CORPUS)
        logging.info(f"LM corpus: {corpus} (give it to asr.sh as --lm_train_text {corpus})")
    prepare(
        args.librispeech_dir,
        args.data_dir,
        args.splits,
        args.download,
        args.download_dir,
        args.url_base,
        args.overwrite,
        dict(args.combine),
    )


if __name__ == "__main__":
    run(main)
