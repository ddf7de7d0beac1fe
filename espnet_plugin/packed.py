"""A trained model as one file: ESPnet's packed-model zip (``espnet2.main_funcs.pack_funcs``:
``meta.yaml`` naming the files, each under its path relative to the recipe folder) with a
``checksums.sha256`` of every other member, and the model's files wherever they come from.

A zip is verified against its checksums before it is unpacked (ESPnet's ``unpack``, which points
the configs' paths at the unpacked files) into a folder the user chooses or a cache folder named
after its checksums, so a model unpacks once and a changed one never reuses an old copy. An
experiment folder (``exp/asr_<tag>``) is read in place, its configs' relative paths resolved
against the recipe folder that holds it.
"""

import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from espnet2.main_funcs.pack_funcs import unpack

from espnet_plugin.cli import UserError

CHECKSUMS = "checksums.sha256"
META = "meta.yaml"
CONFIG = "config.yaml"
DECODE_CONFIG = "decode.yaml"  # beside config.yaml: the decoding options RESULTS.md was made with
DEFAULT_WEIGHTS = "valid.acc.ave.pth"
UNPACKED_MARK = ".unpacked"  # in an unpack folder: the checksums digest of the zip it holds


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def member_checksums(archive: zipfile.ZipFile) -> dict[str, str]:
    """sha256 of each member but the checksums file; a member zip cannot read is a UserError."""
    sums = {}
    for name in archive.namelist():
        if name == CHECKSUMS or name.endswith("/"):
            continue
        digest = hashlib.sha256()
        try:
            with archive.open(name) as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except (zipfile.BadZipFile, OSError) as err:
            raise UserError(f"{archive.filename}: member {name} cannot be read ({err}); the zip "
                            "is damaged: download or pack it again") from None
        sums[name] = digest.hexdigest()
    return sums


def format_checksums(sums: dict[str, str]) -> str:
    """``sha256sum``'s format: ``unzip`` then ``sha256sum -c checksums.sha256`` checks them too."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def add_checksums(path: Path) -> None:
    """Append ``checksums.sha256`` of every member to the zip at ``path``."""
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(CHECKSUMS, format_checksums(member_checksums(archive)))


def verify(path: Path) -> str:
    """Check every member of the zip at ``path`` against its checksums; returns the digest of the
    checksums (what names its content). A mismatch, a missing or an extra member is a UserError."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{path}: not a readable zip ({err})") from None
    with archive:
        if CHECKSUMS not in archive.namelist():
            raise UserError(f"{path}: no {CHECKSUMS}; pack it with asr.sh stage 12")
        listed = {}
        for line in archive.read(CHECKSUMS).decode().splitlines():
            digest, _, name = line.partition("  ")
            listed[name] = digest
        found = member_checksums(archive)
    for name in sorted(listed.keys() | found.keys()):
        if name not in found:
            raise UserError(f"{path}: {name} is listed in {CHECKSUMS} but missing from the zip")
        if name not in listed:
            raise UserError(f"{path}: {name} is not listed in {CHECKSUMS}: it was added after "
                            "packing")
        if listed[name] != found[name]:
            raise UserError(f"{path}: {name} does not match its checksum: the file was changed "
                            "after packing or the download is damaged")
    return sha256(format_checksums(listed).encode())


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "espnet_plugin" / "models"


def unpack_zip(path: Path, out_dir: Optional[Path] = None) -> dict[str, str]:
    """Verify the zip and unpack it into ``out_dir`` (default: the cache folder named after its
    checksums); ESPnet's ``unpack`` result: asr_train_config, asr_model_file (lm_* with an LM).
    A folder that holds something else is never written into."""
    digest = verify(path)
    if out_dir is None:
        out_dir = cache_dir() / f"{path.stem}-{digest[:12]}"
    out_dir = out_dir.resolve()
    mark = out_dir / UNPACKED_MARK
    if mark.is_file() and mark.read_text().strip() == digest:
        return unpack(path, out_dir, use_cache=True)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not mark.is_file():
            raise UserError(f"--unpack_dir {out_dir}: not empty and not an unpacked model; "
                            "choose an empty or new folder")
        if out_dir.parent != cache_dir():
            raise UserError(f"--unpack_dir {out_dir}: holds another unpacked model; choose "
                            "an empty or new folder")
    if mark.is_file():  # a cache folder left by an interrupted unpack
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = unpack(path, out_dir, use_cache=False)
    mark.write_text(digest + "\n")
    return files


@dataclass
class ModelFiles:
    """What ``Speech2Text`` is built from; ``decode_config`` and the LM may be absent."""

    asr_train_config: Path
    asr_model_file: Path
    decode_config: Optional[Path] = None
    lm_train_config: Optional[Path] = None
    lm_file: Optional[Path] = None


def model_files(model: Path, unpack_dir: Optional[Path] = None,
                weights: str = DEFAULT_WEIGHTS) -> ModelFiles:
    """The files of a packed zip (unpacked first), an unpacked one (its ``meta.yaml``) or an
    experiment folder (``config.yaml`` and ``weights``)."""
    if model.is_file():
        files = unpack_zip(model, unpack_dir)
    elif (model / META).is_file():
        meta = yaml.safe_load((model / META).read_text())
        files = {k: str(model / v) for k, v in {**meta["files"], **meta["yaml_files"]}.items()}
    elif (model / CONFIG).is_file():
        files = {"asr_train_config": str(model / CONFIG), "asr_model_file": str(model / weights)}
    else:
        raise UserError(f"--model {model}: neither a packed model (.zip) nor a folder with "
                        f"{CONFIG} or {META}")
    found = ModelFiles(**{k: Path(v) for k, v in files.items()})
    if not found.asr_model_file.is_file():
        raise UserError(f"--model {model}: no weights {found.asr_model_file} (an unfinished "
                        "training, or name the weights file with --model_file)")
    decode = found.asr_train_config.parent / DECODE_CONFIG
    found.decode_config = decode if decode.is_file() else None
    return found


def resolved_config(config: Path, out_dir: Path) -> Path:
    """``config`` with each relative path that names a file of the recipe folder holding it made
    absolute, written into ``out_dir``; ``config`` itself where it has none."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    bases = list(config.resolve().parents)
    changed = False

    def resolve(value):
        nonlocal changed
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, str) and "/" in value and not os.path.isabs(value) \
                and not Path(value).is_file():
            for base in bases:
                if (base / value).is_file():
                    changed = True
                    return str(base / value)
        return value

    data = resolve(data)
    if not changed:
        return config
    out = Path(tempfile.mkdtemp(dir=out_dir)) / config.name
    out.write_text(yaml.safe_dump(data), encoding="utf-8")
    return out
