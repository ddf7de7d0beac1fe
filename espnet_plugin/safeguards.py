"""What the plugin's wrappers of ESPnet's programs add to them, installed before they run.

* Files written with ``torch.save`` to a path appear whole or not at all (written beside, then
  renamed): a training killed while saving ``checkpoint.pth`` keeps the previous one and resumes
  from it. ESPnet writes in place, so such a kill left a truncated checkpoint that stopped every
  later resume with torch's "central directory" error.
* A checkpoint that cannot be read (cut short before this existed, or a full disk) stops the
  resume with a message naming it and the way out, instead of torch's error alone.
* Audio that cannot be read while ESPnet loads it names the wav.scp, the utterance and the file
  (ESPnet's reader lets soundfile's error through, which names none of them), and an empty file is
  refused there instead of failing later in padding.
"""

import functools
import os
from pathlib import Path

import torch
from espnet2.fileio.sound_scp import SoundScpReader
from espnet2.train.trainer import Trainer

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


@functools.cache
def install() -> None:
    """Install the safeguards into this process (once; spawned workers call it again)."""
    torch.save = atomic_save
    Trainer.resume = staticmethod(_resume_or_explain(Trainer.resume))
    SoundScpReader.__getitem__ = _named_audio(SoundScpReader.__getitem__)
