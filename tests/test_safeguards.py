"""What the plugin's wrappers add to ESPnet's programs: a checkpoint survives a kill while it is
being saved, an unreadable one stops the resume with a message that names it, and unreadable audio
names its utterance and file."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile
import torch
from espnet2.fileio.sound_scp import SoundScpReader
from espnet2.train.trainer import Trainer

from espnet_plugin import safeguards
from espnet_plugin.cli import UserError

# Saves a first checkpoint, then is killed (SIGKILL: no clean-up runs) while saving a second.
KILLED_WHILE_SAVING = textwrap.dedent("""
    import os, signal, sys, torch
    if sys.argv[2] == "safeguarded":
        from espnet_plugin import safeguards
        safeguards.install()

    class KilledWhilePickled:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save({"epoch": 1, "weights": torch.ones(1000)}, sys.argv[1])
    torch.save({"epoch": 2, "weights": torch.zeros(1000), "kill": KilledWhilePickled()}, sys.argv[1])
""")


def kill_while_saving(path, mode):
    result = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(path), mode],
                            capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr


def test_a_kill_while_saving_keeps_the_previous_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoint.pth"
    kill_while_saving(checkpoint, "safeguarded")
    state = torch.load(checkpoint)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.ones(1000))


def test_without_the_safeguard_the_same_kill_truncates_it(tmp_path):
    """The failure the safeguard exists for, reproduced with torch.save as ESPnet calls it."""
    checkpoint = tmp_path / "checkpoint.pth"
    kill_while_saving(checkpoint, "plain")
    with pytest.raises(Exception):
        torch.load(checkpoint)


def test_an_unreadable_checkpoint_is_named_with_the_way_out(tmp_path):
    safeguards.install()
    torch.save({"x": 1}, tmp_path / "1epoch.pth")
    (tmp_path / "checkpoint.pth").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(RuntimeError) as error:
        Trainer.resume(checkpoint=tmp_path / "checkpoint.pth", model=None, reporter=None,
                       optimizers=[], schedulers=[], scaler=None)
    message = str(error.value)
    assert f"cannot resume from {tmp_path / 'checkpoint.pth'}" in message
    assert "1epoch.pth" in message and "--overwrite true" in message


def test_a_save_to_a_file_object_is_unchanged(tmp_path):
    with open(tmp_path / "x.pth", "wb") as f:
        safeguards.atomic_save({"a": torch.arange(3)}, f)
    assert torch.equal(torch.load(tmp_path / "x.pth")["a"], torch.arange(3))
    assert list(tmp_path.iterdir()) == [tmp_path / "x.pth"]


def test_unreadable_and_empty_audio_name_the_utterance(tmp_path):
    safeguards.install()
    soundfile.write(tmp_path / "ok.wav", np.ones(800, "float32") * 0.1, 8000)
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, "float32"), 8000)
    scp = tmp_path / "wav.scp"
    scp.write_text(f"empty {tmp_path / 'empty.wav'}\ngone {tmp_path / 'gone.wav'}\n"
                   f"ok {tmp_path / 'ok.wav'}\n")
    reader = SoundScpReader(str(scp), dtype="float32")
    assert reader["ok"][1].shape == (800,)
    with pytest.raises(RuntimeError, match=r"wav.scp: utterance 'gone': cannot read audio file "
                                           r".*gone.wav"):
        reader["gone"]
    with pytest.raises(RuntimeError, match=r"utterance 'empty': audio file .*empty.wav is empty"):
        reader["empty"]


def test_audio_that_cannot_be_decoded_is_named_before_decoding(tmp_path):
    soundfile.write(tmp_path / "ok.wav", np.ones(800, "float32") * 0.1, 8000)
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, "float32"), 8000)
    scp = tmp_path / "wav.scp"
    scp.write_text(f"empty {tmp_path / 'empty.wav'}\ngone {tmp_path / 'gone.wav'}\n"
                   f"ok {tmp_path / 'ok.wav'}\n")
    argv = ["--data_path_and_name_and_type", f"{scp},speech,sound", "--output_dir", "x"]
    with pytest.raises(UserError) as error:
        safeguards.check_audio_inputs(argv)
    message = str(error.value)
    assert "2 utterance(s) cannot be decoded" in message
    assert "utterance 'gone': cannot read audio file" in message and "gone.wav" in message
    assert "utterance 'empty': audio file" in message and "is empty" in message
    keys = tmp_path / "keys"
    keys.write_text("ok\n")
    safeguards.check_audio_inputs([*argv, "--key_file", str(keys)])  # only ok: nothing to say


def test_a_loader_worker_names_the_file(tmp_path):
    from espnet2.train import iterable_dataset

    safeguards.install()
    with pytest.raises(RuntimeError, match=r"cannot read audio file .*gone.wav"):
        iterable_dataset.DATA_TYPES["sound"](str(tmp_path / "gone.wav"))
