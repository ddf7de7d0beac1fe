"""What a recipe output was made from, so that a stage redoes it when that changes.

A stamp is ``<output dir>/.stamp``: the options that matter, a content hash of each input file
and the config sections the output depends on. ``asr.sh`` asks before a stage's work whether the
stamp of its output still matches what it would be made from now, and writes the stamp after the
work succeeded:

    python -m espnet_plugin.recipe.stamp check --dir dump/raw/train_sp \\
        --option max_wav_duration=20 --file data/train/wav.scp --config conf/x.yaml:frontend_conf
    python -m espnet_plugin.recipe.stamp write --dir dump/raw/train_sp ...   (same inputs)

``check`` prints ``current``, ``absent``, or ``stale`` followed by one line per change;
``digest`` prints 8 hex digits of what the inputs hold, wherever they are, to name an output after
them (the statistics of each frontend get their own folder) or to compare two configs' sections.
"""

import argparse
import hashlib
import json
from pathlib import Path

import yaml

from espnet_plugin.cli import UserError, run

STAMP_FILE = ".stamp"
ABSENT = "absent"


def file_hash(path: Path) -> str:
    """First 16 hex digits of the file's SHA-256, or "absent"."""
    if not path.is_file():
        return ABSENT
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def config_sections(spec: str) -> dict:
    """``path:key1,key2`` -> {key: value} of those top-level keys of a YAML config (None if absent)."""
    path, _, keys = spec.rpartition(":")
    if not path or not keys:
        raise UserError(f"--config {spec!r}: expected <yaml file>:<key>[,<key>...]")
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise UserError(f"--config {path}: cannot read it ({err})") from err
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a YAML mapping of options")
    return {key: config.get(key) for key in keys.split(",")}


def make_stamp(options: list[str], files: list[str], configs: list[str]) -> dict:
    parsed = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or not name:
            raise UserError(f"--option {option!r}: expected <name>=<value>")
        parsed[name] = value
    return {
        "options": parsed,
        "files": {path: file_hash(Path(path)) for path in files},
        "configs": {spec.rpartition(":")[0]: config_sections(spec) for spec in configs},
    }


def changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two stamps."""
    lines = []
    for section, label in (("options", "option"), ("files", "file"), ("configs", "config")):
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(before.keys() | after.keys()):
            if before.get(key) == after.get(key):
                continue
            if section == "files":
                was, now = before.get(key, "not an input"), after.get(key, "not an input")
                lines.append(f"file {key}: content {was} -> {now}")
            elif section == "configs":
                was, now = before.get(key, {}), after.get(key, {})
                for part in sorted(was.keys() | now.keys()):
                    if was.get(part) != now.get(part):
                        lines.append(f"config {key}: {part} {was.get(part)} -> {now.get(part)}")
            else:
                lines.append(f"option {key}: {before.get(key, '(unset)')!r} -> "
                             f"{after.get(key, '(unset)')!r}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m espnet_plugin.recipe.stamp", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("action", choices=("check", "write", "digest"))
    parser.add_argument("--dir", type=Path, help="the output folder (check, write)")
    parser.add_argument("--option", action="append", default=[], help="<name>=<value>")
    parser.add_argument("--file", action="append", default=[], help="an input file")
    parser.add_argument("--config", action="append", default=[],
                        help="<yaml file>:<key>[,<key>...]: config sections the output depends on")
    parser.add_argument("--note", action="append", default=[],
                        help="write: <name>=<text> recorded of how it was made, never compared")
    args = parser.parse_args(argv)
    stamp = make_stamp(args.option, args.file, args.config)
    if args.action == "digest":  # what the inputs hold, wherever they are
        content = [stamp["options"], sorted(stamp["files"].values()),
                   [sections for _, sections in sorted(stamp["configs"].items())]]
        print(hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8])
        return
    if args.dir is None:
        raise UserError(f"{args.action} needs --dir (the output folder)")
    path = args.dir / STAMP_FILE
    if args.action == "write":
        if not args.dir.is_dir():
            raise UserError(f"--dir {args.dir} does not exist: nothing was made there")
        if args.note:
            stamp["notes"] = dict(note.partition("=")[::2] for note in args.note)
        tmp = path.with_name(STAMP_FILE + ".partial")
        tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
        return
    if not path.is_file():
        print(ABSENT)
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        old = {}
    differences = changes(old, stamp)
    print("\n".join(["stale", *differences]) if differences else "current")


if __name__ == "__main__":
    run(main)
