"""Kaldi-style data directories: the one reader, validator and writer the recipe steps share.

A data dir holds ``wav.scp`` (utt -> audio file), ``text`` (utt -> transcript), ``utt2spk`` and
``spk2utt``, optionally ``utt2num_samples``; every file is sorted by its first field in C-locale
(byte) order, which Kaldi and ESPnet tools rely on. Utterance ids start with their speaker id so
that sorting by utterance also groups utterances by speaker. Every recipe step writes through
:func:`write_data_dir`, so a re-run with the same result is a no-op and a re-run with a different
result never replaces finished data unless asked to.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import soundfile

from espnet_plugin.cli import UserError

# Files a data dir may hold, in the order they are written.
DATA_FILES = ("wav.scp", "text", "utt2spk", "spk2utt", "utt2num_samples")


class DataDirExistsError(UserError, FileExistsError):
    """The destination already holds different data and overwriting was not asked for."""


@dataclass
class DataDir:
    """One data dir in memory: per-utterance tables keyed by utterance id."""

    wav_scp: dict[str, str]
    text: dict[str, str]
    utt2spk: dict[str, str]
    utt2num_samples: dict[str, int] | None = None

    @property
    def utts(self) -> list[str]:
        return sorted(self.wav_scp)

    def spk2utt(self) -> dict[str, list[str]]:
        spk2utt: dict[str, list[str]] = {}
        for utt in self.utts:
            spk2utt.setdefault(self.utt2spk[utt], []).append(utt)
        return dict(sorted(spk2utt.items()))

    def check(self, where: str | Path, allow_empty_text: bool = False) -> None:
        """Raise :class:`UserError` unless the tables describe one consistent data dir."""
        if not self.wav_scp:
            raise UserError(f"{where}/wav.scp: no utterances")
        for utt in self.wav_scp:
            if not utt or any(c.isspace() for c in utt):
                raise UserError(f"{where}/wav.scp: utterance id {utt!r} is empty or has spaces")
        tables = {"text": self.text, "utt2spk": self.utt2spk}
        if self.utt2num_samples is not None:
            tables["utt2num_samples"] = self.utt2num_samples
        for name, table in tables.items():
            extra = sorted(table.keys() - self.wav_scp.keys())
            if extra:
                problem = "is a transcript line with no audio" if name == "text" else "has no audio"
                raise UserError(
                    f"{where}/{name}: utterance '{extra[0]}' {problem}: "
                    f"no entry in {where}/wav.scp"
                )
            missing = sorted(self.wav_scp.keys() - table.keys())
            if missing:
                raise UserError(
                    f"{where}/{name}: no entry for utterance '{missing[0]}' of wav.scp"
                )
        for utt, speaker in self.utt2spk.items():
            if not speaker or any(c.isspace() for c in speaker):
                raise UserError(f"{where}/utt2spk: speaker of '{utt}' is empty or has spaces")
        if not allow_empty_text:
            for utt, words in self.text.items():
                if not words.strip():
                    raise UserError(f"{where}/text: utterance '{utt}' has an empty transcript")
        utts = self.utts
        for prev, utt in zip(utts, utts[1:]):
            if self.utt2spk[utt] < self.utt2spk[prev]:
                raise UserError(
                    f"{where}/utt2spk: utterance '{utt}' (speaker '{self.utt2spk[utt]}') sorts "
                    f"after '{prev}' (speaker '{self.utt2spk[prev]}'), so sorting by utterance "
                    "and by speaker disagree; start utterance ids with their speaker id"
                )

    def render(self) -> dict[str, str]:
        """The content of each file, sorted by id."""
        utts = self.utts
        files = {
            "wav.scp": [f"{u} {self.wav_scp[u]}" for u in utts],
            "text": [f"{u} {self.text[u]}".rstrip() for u in utts],
            "utt2spk": [f"{u} {self.utt2spk[u]}" for u in utts],
            "spk2utt": [f"{s} {' '.join(us)}" for s, us in self.spk2utt().items()],
        }
        if self.utt2num_samples is not None:
            files["utt2num_samples"] = [f"{u} {self.utt2num_samples[u]}" for u in utts]
        return {name: "".join(line + "\n" for line in lines) for name, lines in files.items()}


def combine(parts: list[DataDir], where: str | Path) -> DataDir:
    """One data dir holding the utterances of all ``parts``, like Kaldi's combine_data.sh."""
    out = DataDir(wav_scp={}, text={}, utt2spk={})
    for part in parts:
        shared = sorted(out.wav_scp.keys() & part.wav_scp.keys())
        if shared:
            raise UserError(f"{where}: utterance '{shared[0]}' is in two of the combined dirs")
        out.wav_scp.update(part.wav_scp)
        out.text.update(part.text)
        out.utt2spk.update(part.utt2spk)
    return out


def read_table(
    path: str | Path, empty_ok: bool = False, value_name: str = "value", sorted_ids: bool = True
) -> dict[str, str]:
    """Read one Kaldi table, ``id value`` per line: the one reader of the recipe's text files.

    Rejects a missing file, text that is not UTF-8, empty lines, duplicate ids, an empty value
    (unless ``empty_ok``: an id alone then maps to "") and, with ``sorted_ids``, ids out of
    C-locale order. Lines break at newlines only, so a transcript may hold any other character.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    table: dict[str, str] = {}
    line_of: dict[str, int] = {}
    prev = None
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            lines = f.read().removesuffix("\n")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from None
    for lineno, line in enumerate(lines.split("\n") if lines else [], 1):
        fields = line.split(maxsplit=1)
        if not fields:
            raise UserError(f"{path}:{lineno}: empty line; expected '<id> <{value_name}>'")
        key = fields[0]
        value = fields[1].rstrip() if len(fields) == 2 else ""
        if key in table:
            raise UserError(
                f"{path}:{lineno}: duplicate id '{key}' (first on line {line_of[key]})"
            )
        if sorted_ids and prev is not None and key < prev:
            raise UserError(
                f"{path}:{lineno}: '{key}' comes after '{prev}'; the file must be sorted by "
                "id in C-locale order (LC_ALL=C sort)"
            )
        if not value and not empty_ok:
            raise UserError(f"{path}:{lineno}: '{key}' has an empty {value_name}")
        table[key], line_of[key], prev = value, lineno, key
    return table


def read_text(path: str | Path) -> dict[str, str]:
    """Transcripts of a ``text`` file in any order (a decoder's hypothesis may be empty)."""
    return read_table(path, empty_ok=True, value_name="transcript", sorted_ids=False)


def read_data_dir(path: str | Path, allow_empty_text: bool = False) -> DataDir:
    """Read and validate a data dir; errors name the file and the line or id at fault."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"data dir {path} does not exist")
    num_samples_file = path / "utt2num_samples"
    utt2num_samples = None
    if num_samples_file.exists():
        utt2num_samples = {}
        for utt, value in read_table(num_samples_file).items():
            if not (value.isascii() and value.isdigit()):
                raise UserError(f"{num_samples_file}: '{utt}' has non-integer length {value!r}")
            utt2num_samples[utt] = int(value)
    data = DataDir(
        wav_scp=read_table(path / "wav.scp", value_name="audio path"),
        text=read_table(path / "text", empty_ok=allow_empty_text, value_name="transcript"),
        utt2spk=read_table(path / "utt2spk", value_name="speaker"),
        utt2num_samples=utt2num_samples,
    )
    data.check(path, allow_empty_text=allow_empty_text)
    spk2utt = {s: us.split() for s, us in read_table(path / "spk2utt").items()}
    expected = data.spk2utt()
    for speaker in sorted(spk2utt.keys() | expected.keys()):
        listed, derived = spk2utt.get(speaker, []), expected.get(speaker, [])
        if listed != derived:
            raise UserError(
                f"{path}/spk2utt does not match {path}/utt2spk for speaker '{speaker}': "
                f"only in spk2utt: {sorted(set(listed) - set(derived))}, "
                f"only in utt2spk: {sorted(set(derived) - set(listed))}"
                + (", utterances out of order" if sorted(listed) == sorted(derived) else "")
            )
    return data


def conflicts(data: DataDir, path: str | Path) -> list[str]:
    """Names of files in ``path`` that writing ``data`` there would change or leave stale."""
    path = Path(path)
    files = data.render()
    changed = []
    for name in DATA_FILES:
        target = path / name
        if target.exists() and (name not in files or target.read_text("utf-8") != files[name]):
            changed.append(name)
    return changed


def write_data_dir(data: DataDir, path: str | Path, overwrite: bool = False) -> bool:
    """Write ``data`` to ``path``; returns False when ``path`` already held exactly this data.

    A different existing data dir is only replaced with ``overwrite``; files are replaced
    atomically so an interrupted write never leaves a half-written file behind.
    """
    path = Path(path)
    data.check(path)
    changed = conflicts(data, path)
    if changed and not overwrite:
        raise DataDirExistsError(
            f"{path} already holds a different data dir ({', '.join(changed)} would change); "
            "remove it or re-run with --overwrite to replace it"
        )
    files = data.render()
    written = False
    path.mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        target = path / name
        if name not in files:
            if target.exists():  # stale: belongs to the data dir being replaced
                target.unlink()
                written = True
        elif not target.exists() or target.read_text("utf-8") != files[name]:
            tmp = target.with_name(f".{name}.tmp")
            tmp.write_text(files[name], "utf-8")
            os.replace(tmp, target)
            written = True
    if written:
        logging.info(
            f"wrote {path}: {len(data.wav_scp)} utterances, speakers: {len(data.spk2utt())}"
        )
    else:
        logging.info(f"{path} is already up to date ({len(data.wav_scp)} utterances)")
    return written


def audio_info(path: str | Path, context: str):
    """``soundfile.info`` of one audio file (header only, no decode), or an error naming it."""
    try:
        return soundfile.info(str(path))
    except RuntimeError as err:  # soundfile.LibsndfileError for missing, corrupt or odd files
        raise UserError(f"{context}: cannot read audio file {path}: {err}") from err


def add_overwrite_option(parser) -> None:
    """The one way a data-prep command may replace different, existing output: on request."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output that differs from what this run would write",
    )
