"""asr.sh stage 12: an experiment packed into one zip that loads on another machine.

    python -m espnet_plugin.recipe.pack --exp_dir exp/asr_x --decode_dir decode_... \\
        --test_sets "dev test" --file data/en_token_list/bpe_unigram300/tokens.txt ... \\
        --out exp/asr_x/packed/asr_x.zip

Run from the recipe folder. The experiment must be finished and current: its training stamp
present with every input it lists unchanged, and each test set decoded and scored from the
weights being packed (their stamps current); else one line says what is stale. It writes beside
the weights ``decode.yaml`` (the decoding config with the decode's own options on top: what
RESULTS.md was made with), ``RESULTS.md`` and ``README.md`` (the model card), then packs with
ESPnet's packer (:func:`espnet2.main_funcs.pack_funcs.pack`) and adds the card at the zip's root
and ``checksums.sha256`` (:mod:`espnet_plugin.packed`). Paths inside are relative to the recipe
folder, in the configs too.
"""

import argparse
import contextlib
import io
import logging
import os
import re
import shlex
import subprocess
import zipfile
from importlib import metadata
from pathlib import Path

import yaml

from espnet_plugin.cli import UserError, run
from espnet_plugin.packed import CONFIG, DECODE_CONFIG, META, add_checksums
from espnet_plugin.recipe.report import profile_numbers
from espnet_plugin.recipe.score import format_table
from espnet_plugin.recipe.study_layout import StampCheck, System, read_model, read_test_set

logger = logging.getLogger(__name__)
README, RESULTS = "README.md", "RESULTS.md"


def decode_config(inference_config: str, inference_args: str) -> dict:
    """The decoding config's options with ``--name value`` of ``inference_args`` on top."""
    options = {}
    if inference_config:
        options = yaml.safe_load(Path(inference_config).read_text(encoding="utf-8")) or {}
    words = shlex.split(inference_args)
    while words:
        name = words.pop(0)
        if "=" in name:
            name, value = name.split("=", 1)
        elif words and not words[0].startswith("--"):
            value = words.pop(0)
        else:
            raise UserError(f"--inference_args {inference_args!r}: expected --name value pairs, "
                            f"got {name!r} without a value")
        if not name.startswith("--"):
            raise UserError(f"--inference_args {inference_args!r}: {name!r} is not an option")
        options[name[2:]] = yaml.safe_load(value)
    return options


def current_system(exp_dir: Path, weights: str, decode_dir: str, test_sets: list[str]) -> System:
    """The experiment and its scored decode of ``test_sets``, refused where unfinished or stale."""
    stamps = StampCheck(Path.cwd())
    if not (exp_dir / weights).is_file():
        raise UserError(f"{exp_dir}: no {weights}: the training is unfinished (asr.sh stage 5)")
    _, stale = stamps.check(exp_dir)
    if stale:
        raise UserError(f"{exp_dir} is unfinished or stale: {'; '.join(stale)}; train it again "
                        "(asr.sh stage 5) before packing")
    system = System(read_model(exp_dir, exp_dir.parent, stamps), decode_dir, {}, None, None)
    for name in test_sets:
        folder = exp_dir / decode_dir / name
        if not (folder / "score_word" / "result.json").is_file():
            raise UserError(f"{folder}: not scored; run asr.sh stages 8-9 before packing")
        test_set = read_test_set(folder, stamps)
        if test_set.stale:
            raise UserError(f"{folder} is stale: {'; '.join(test_set.stale)}; decode and score "
                            "it again (asr.sh stages 8-9) before packing")
        system.test_sets[name] = test_set
    return system


def results_markdown(system: System) -> str:
    tables = [format_table(test_set.scores[unit]) for test_set in system.test_sets.values()
              for unit in ("word", "char") if unit in test_set.scores]
    return (f"# RESULTS\n\nDecoded with `{system.decode}` ({DECODE_CONFIG} beside the "
            "weights holds its options).\n\n" + "\n\n".join(tables) + "\n")


def plugin_version() -> str:
    """The installed espnet_plugin's version, and the commit of its source where it is a git
    checkout."""
    version = metadata.version("espnet_plugin")
    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return version
    return f"{version} (commit {commit})"


def training_command(exp_dir: Path) -> str:
    """The training program's command line, as ESPnet's trainer logged it in train.log."""
    log = exp_dir / "train.log"
    if log.is_file():
        with log.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                found = re.search(r"\S*(espnet_plugin|espnet2)/bin/asr_train\.py (.*)", line)
                if found:
                    return f"python -m {found.group(1)}.bin.asr_train {found.group(2).strip()}"
    return "(not found: train.log is missing)"


def parameters(weights: Path) -> int:
    import torch

    state = torch.load(weights, map_location="cpu", weights_only=True)
    return sum(t.numel() for t in state.values() if hasattr(t, "numel"))


def model_card(system: System, exp_dir: Path, weights: str, train_set: str, zip_name: str,
               results: str) -> str:
    config = yaml.safe_load((exp_dir / CONFIG).read_text(encoding="utf-8"))
    arch = system.model.arch
    cost = profile_numbers(system)
    rows = [("Parameters", f"{parameters(exp_dir / weights):,}"),
            ("Decoder cache per utterance (KB)", cost["cache_kb_per_utterance"]),
            ("Decode time per utterance (ms)", cost["decode_ms_per_utterance"]),
            ("Real-time factor", cost["rtf"]),
            ("Peak memory (MB)", cost["peak_memory_mb"])]
    measured = "\n".join(f"| {name} | {value if isinstance(value, str) else '-' if value is None else f'{value:.3g}'} |"
                         for name, value in rows)
    fs = (config.get("frontend_conf") or {}).get("fs", "16k")
    return f"""---
library_name: espnet
tags: [espnet, espnet_plugin, audio, automatic-speech-recognition]
---
# {exp_dir.name}

ESPnet2 ASR model trained with espnet_plugin {plugin_version()}.

## Model

| | |
|---|---|
| Encoder | {config.get('encoder')} (attention: {arch.attention}, size {arch.size}) |
| Decoder | {config.get('decoder')} (self-attention: {arch.decoder_attention}) |
| Tokens | {config.get('token_type')}, {len(config.get('token_list') or [])} |
| Frontend | {config.get('frontend')}, {fs} audio |
| Weights | {weights} |

## Data

Trained on `{train_set}`; tested on {', '.join(f'`{t}`' for t in system.test_sets)}.

## Training command

```
{training_command(exp_dir)}
```

## Results

{results.split(chr(10), 1)[1].strip()}

## Size, cache and speed (asr.sh stage 10, on the machine that trained it)

| | |
|---|---|
{measured}

## How to use

```
pip install espnet_plugin   # registers its classes in ESPnet when imported
python -m espnet_plugin.bin.transcribe --model {zip_name} audio.wav
```

```python
from espnet_plugin import Transcriber
transcribe = Transcriber.from_pretrained("{zip_name}")
print(transcribe("audio.wav"))
```

ESPnet's own `Speech2Text` loads the unpacked model once `espnet_plugin` is imported:
`espnet2.main_funcs.pack_funcs.unpack("{zip_name}", "model")` gives its arguments.
"""


def relative_paths(value, root: Path):
    """``value`` with each absolute path under ``root`` made relative to it."""
    if isinstance(value, dict):
        return {k: relative_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_paths(v, root) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and Path(value).is_relative_to(root):
        return os.path.relpath(value, root)
    return value


def finish_zip(packed: Path, out: Path, card: str) -> None:
    """``packed`` (ESPnet's zip) rewritten to ``out``: configs' paths relative to the recipe
    folder, the model card at the root, the checksums; ``out`` appears whole or not at all."""
    root = Path.cwd().resolve()
    partial = out.with_name(out.name + ".partial")
    with zipfile.ZipFile(packed) as source, zipfile.ZipFile(partial, "w") as target:
        meta = yaml.safe_load(source.read(META))
        for path in [*meta["files"].values(), *meta["yaml_files"].values()]:
            if os.path.isabs(path):
                raise UserError(f"{path} is outside the recipe folder {root}: a packed model "
                                "holds files under relative paths; run from the recipe folder")
        for info in source.infolist():
            data = source.read(info)
            if info.filename in meta["yaml_files"].values():
                data = yaml.safe_dump(relative_paths(yaml.safe_load(data), root)).encode()
            target.writestr(info, data, zipfile.ZIP_DEFLATED)
        target.writestr(README, card, zipfile.ZIP_DEFLATED)
    add_checksums(partial)
    os.replace(partial, out)
    packed.unlink()


def pack_experiment(args: argparse.Namespace) -> None:
    from espnet2.main_funcs.pack_funcs import pack

    exp_dir = Path(args.exp_dir)
    system = current_system(exp_dir, args.weights, args.decode_dir, args.test_sets.split())
    for path in args.file:
        if not Path(path).is_file():
            raise UserError(f"--file {path}: no such file")
    decode_yaml = exp_dir / DECODE_CONFIG
    decode_yaml.write_text(yaml.safe_dump(decode_config(args.inference_config,
                                                        args.inference_args)))
    results = results_markdown(system)
    (exp_dir / RESULTS).write_text(results)
    out = Path(args.out)
    card = model_card(system, exp_dir, args.weights, args.train_set, out.name, results)
    (exp_dir / README).write_text(card)
    files = {"asr_model_file": exp_dir / args.weights}
    yaml_files = {"asr_train_config": exp_dir / CONFIG}
    if args.lm_config:
        files["lm_file"], yaml_files["lm_train_config"] = Path(args.lm_file), Path(args.lm_config)
    out.parent.mkdir(parents=True, exist_ok=True)
    packed = out.with_name(out.stem + ".espnet.zip")
    with contextlib.redirect_stdout(io.StringIO()):  # its "adding: <file>" lines
        pack(files, yaml_files, packed, option=[*args.file, decode_yaml, exp_dir / RESULTS])
    finish_zip(packed, out, card)
    logger.info(f"{out}: {len(zipfile.ZipFile(out).namelist())} files with their checksums")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m espnet_plugin.recipe.pack",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--exp_dir", required=True, help="the experiment: exp/asr_<tag>")
    parser.add_argument("--weights", default="valid.acc.ave.pth", help="under --exp_dir")
    parser.add_argument("--decode_dir", required=True, help="the decode dir under --exp_dir")
    parser.add_argument("--test_sets", required=True, help="its scored test sets (space separated)")
    parser.add_argument("--train_set", default="", help="named in the model card")
    parser.add_argument("--inference_config", default="", help="the decoding YAML, if any")
    parser.add_argument("--inference_args", default="", help="options given on top of it")
    parser.add_argument("--lm_config", default="", help="the fused LM's config.yaml, if any")
    parser.add_argument("--lm_file", default="", help="the fused LM's weights")
    parser.add_argument("--file", action="append", default=[],
                        help="another file to pack: token list, BPE model, feature statistics")
    parser.add_argument("--out", required=True, help="the zip to write")
    return parser


def main(argv=None) -> None:
    pack_experiment(get_parser().parse_args(argv))


if __name__ == "__main__":
    run(main)
