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


def write_config(path, frontend_conf=None, frontend="default"):
    config = {"frontend": frontend, **({"frontend_conf": frontend_conf} if frontend_conf else {})}
    path.write_text(__import__("yaml").safe_dump(config))
    return path


def test_decoding_refuses_audio_at_another_rate_than_the_model_by_name(tmp_path):
    """The decoding program itself (before the model loads): a 16 kHz and a 44.1 kHz file for an
    8 kHz model are named with their rate; the 8 kHz one, stereo included, passes."""
    for name, rate, channels in (("ok", 8000, 1), ("stereo", 8000, 2), ("wide", 16000, 1),
                                 ("cd", 44100, 1)):
        soundfile.write(tmp_path / f"{name}.wav", np.full((800, channels), 0.1, "float32"), rate)
    scp = tmp_path / "wav.scp"
    scp.write_text("".join(f"{n} {tmp_path / n}.wav\n" for n in ("cd", "ok", "stereo", "wide")))
    config = write_config(tmp_path / "config.yaml", {"fs": "8k", "n_fft": 256})
    result = subprocess.run(
        [sys.executable, "-m", "espnet_plugin.bin.asr_inference", "--asr_train_config",
         str(config), "--asr_model_file", str(tmp_path / "model.pth"),
         "--data_path_and_name_and_type", f"{scp},speech,sound", "--output_dir",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    error = result.stderr[result.stderr.index("espnet_plugin.bin.asr_inference: error:"):]
    assert error.strip().splitlines() == [
        f"espnet_plugin.bin.asr_inference: error: {scp}: 2 utterance(s) cannot be decoded:",
        f"  utterance 'cd': audio file {tmp_path}/cd.wav is 44100 Hz, but the model's frontend "
        f"takes 8000 Hz (frontend_conf fs of {config}); resample it (asr.sh stage 2 does)",
        f"  utterance 'wide': audio file {tmp_path}/wide.wav is 16000 Hz, but the model's "
        f"frontend takes 8000 Hz (frontend_conf fs of {config}); resample it (asr.sh stage 2 "
        "does)",
    ]
    keys = tmp_path / "keys"
    keys.write_text("ok\nstereo\n")
    safeguards.check_audio_inputs(["--asr_train_config", str(config), "--key_file", str(keys),
                                   "--data_path_and_name_and_type", f"{scp},speech,sound"])


def test_the_model_rate_is_espnets_default_without_fs_and_none_without_frontend(tmp_path):
    assert safeguards.model_rate(str(write_config(tmp_path / "a.yaml", {"n_fft": 512}))) == 16000
    assert safeguards.model_rate(str(write_config(tmp_path / "b.yaml", {"fs": 44100}))) == 44100
    assert safeguards.model_rate(str(write_config(tmp_path / "c.yaml", frontend=None))) is None
    assert safeguards.model_rate(None) is None
