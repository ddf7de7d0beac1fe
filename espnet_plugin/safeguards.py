"""What the plugin's wrappers of ESPnet's programs add to them, installed before they run.

* Files written with ``torch.save`` to a path appear whole or not at all (written beside, then
  renamed): a training killed while saving ``checkpoint.pth`` keeps the previous one and resumes
  from it. ESPnet writes in place, so such a kill left a truncated checkpoint that stopped every
  later resume with torch's "central directory" error.
* A checkpoint that cannot be read (cut short before this existed, or a full disk) stops the
  resume with a message naming it and the way out, instead of torch's error alone.
* Audio that cannot be read while ESPnet loads it names the file (and, in training, the wav.scp
  and the utterance): ESPnet lets soundfile's error through, which from a loader's worker process
  arrives as "<exception str() failed>". An empty file is refused there instead of failing later
  in padding. Before decoding starts, :func:`check_audio_inputs` reads every listed file's header
  and names each utterance whose audio is missing, unreadable or empty, or at another rate than
  the model's frontend was trained at: ESPnet would decode a 16 kHz file with an 8 kHz model as
  8 kHz speech, without a word, into garbage. Several channels are fine (ESPnet averages them).
"""

import argparse
import functools
import os
from pathlib import Path
from typing import Sequence

import humanfriendly
import soundfile
import torch
import yaml
from espnet2.fileio.sound_scp import SoundScpReader
from espnet2.train import iterable_dataset
from espnet2.train.trainer import Trainer

from espnet_plugin.cli import UserError
from espnet_plugin.recipe.kaldi_data import read_table

_torch_save = torch.save


def atomic_save(obj, f, *args, **kwargs) -> None:
    """``torch.save``; a path is written to ``<path>.partial`` and renamed over it when done."""
    if not isinstance(f, (str, os.PathLike)):
        return _torch_save(obj, f, *args, **kwargs)
    partial = f"{os.fspath(f)}.partial"
    try:
        _torch_save(obj, partial, *args, **kwargs)
        os.replace(partial, f)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _resume_or_explain(resume):
    @functools.wraps(resume)
    def wrapper(checkpoint, *args, **kwargs):
        try:
            return resume(checkpoint, *args, **kwargs)
        except (RuntimeError, EOFError, OSError) as err:
            epochs = sorted(Path(checkpoint).parent.glob("*epoch.pth"))
            raise RuntimeError(
                f"cannot resume from {checkpoint}: it cannot be read ({err}). It was probably "
                "cut short while being written. The weights of the finished epochs are in "
                f"{', '.join(p.name for p in epochs) or 'no <N>epoch.pth file'}; to train this "
                f"experiment again from the start, remove {checkpoint} (asr.sh: --overwrite true)"
            ) from err

    return wrapper


def _named_audio(getitem):
    @functools.wraps(getitem)
    def wrapper(self, key):
        try:
            rate, array = getitem(self, key)
        except (RuntimeError, OSError) as err:
            raise RuntimeError(
                f"{self.fname}: utterance '{key}': cannot read audio file {self.data.get(key)}: "
                f"{err}"
            ) from err
        if array.size == 0:
            raise RuntimeError(
                f"{self.fname}: utterance '{key}': audio file {self.data.get(key)} is empty "
                "(0 samples)"
            )
        return rate, array

    return wrapper


def _named_sound_file(read):
    @functools.wraps(read)
    def wrapper(path):
        try:
            array = read(path)
        except (RuntimeError, OSError) as err:
            raise RuntimeError(f"cannot read audio file {path}: {err}") from None
        if array.size == 0:
            raise RuntimeError(f"audio file {path} is empty (0 samples)")
        return array

    return wrapper


def model_rate(asr_train_config: str | None) -> int | None:
    """The sampling rate a model's frontend expects: ``frontend_conf.fs`` of its config.yaml,
    ESPnet's default 16k where absent; None without a config or a frontend (it reads features)."""
    if asr_train_config is None:
        return None
    try:
        config = yaml.safe_load(Path(asr_train_config).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"--asr_train_config {asr_train_config}: cannot read it ({err})") from None
    if config.get("frontend", "default") is None:
        return None
    fs = (config.get("frontend_conf") or {}).get("fs", "16k")
    return int(humanfriendly.parse_size(fs) if isinstance(fs, str) else fs)


def check_audio_inputs(argv: Sequence[str]) -> None:
    """Every utterance a decoding program is about to read (``--data_path_and_name_and_type
    <wav.scp>,speech,sound``, restricted to ``--key_file``): its file exists, its header reads,
    it holds samples and it is at the rate of ``--asr_train_config``'s frontend; a UserError lists
    the utterances that fail."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data_path_and_name_and_type", action="append", default=[])
    parser.add_argument("--key_file")
    parser.add_argument("--asr_train_config")
    args, _ = parser.parse_known_args(argv)
    fs = model_rate(args.asr_train_config)
    keys = None if args.key_file is None else set(
        read_table(args.key_file, empty_ok=True, value_name="key", sorted_ids=False))
    problems = []
    for triple in args.data_path_and_name_and_type:
        scp, _, kind = triple.split(",")
        if kind != "sound":
            continue
        for utt, path in read_table(scp, value_name="audio path", sorted_ids=False).items():
            if keys is not None and utt not in keys:
                continue
            try:
                info = soundfile.info(path)
            except (RuntimeError, OSError) as err:
                problems.append(f"utterance '{utt}': cannot read audio file {path}: {err}")
                continue
            if info.frames == 0:
                problems.append(f"utterance '{utt}': audio file {path} is empty (0 samples)")
            elif fs is not None and info.samplerate != fs:
                problems.append(
                    f"utterance '{utt}': audio file {path} is {info.samplerate} Hz, but the "
                    f"model's frontend takes {fs} Hz (frontend_conf fs of "
                    f"{args.asr_train_config}); resample it (asr.sh stage 2 does)")
        if problems:
            raise UserError(f"{scp}: {len(problems)} utterance(s) cannot be decoded:\n  "
                            + "\n  ".join(problems[:20]))


@functools.cache
def install() -> None:
    """Install the safeguards into this process (once; spawned workers call it again)."""
    torch.save = atomic_save
    Trainer.resume = staticmethod(_resume_or_explain(Trainer.resume))
    SoundScpReader.__getitem__ = _named_audio(SoundScpReader.__getitem__)
    iterable_dataset.DATA_TYPES["sound"] = _named_sound_file(iterable_dataset.DATA_TYPES["sound"])
