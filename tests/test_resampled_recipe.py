"""A test set that mixes sampling rates, on the small recipe's tiny model: stage 2 brings a 16 kHz
and a 44.1 kHz copy of a recorded 8 kHz prompt back to 8 kHz, and they decode to the original's
hypothesis; with --resample false stage 2 refuses them by name instead. The copies are made with
scipy's polyphase resampler, not the one stage 2 uses."""

from math import gcd

import numpy as np
import scipy.signal
import soundfile

from conftest import ASR_EXP, DECODE, FAST_DECODING, TINY, copy_recipe, run_recipe

RATES = {"16k": 16000, "44k": 44100}


def mixed_rate_set(work, utt: str, path: str) -> dict[str, str]:
    """``data/mixed``: the prompt as it is and at each rate of RATES; returns utterance -> file."""
    wave, rate = soundfile.read(path, dtype="float64")
    assert rate == 8000
    files = {f"{utt}-8k": path}
    for name, target in RATES.items():
        up, down = target // gcd(target, rate), rate // gcd(target, rate)
        copy = np.clip(scipy.signal.resample_poly(wave, up, down), -1, 1)
        files[f"{utt}-{name}"] = str(work / "audio" / f"{utt}-{name}.wav")
        (work / "audio").mkdir(exist_ok=True)
        soundfile.write(files[f"{utt}-{name}"], copy, target, subtype="PCM_16")
    data = work / "data" / "mixed"
    data.mkdir()
    text = (work / "data" / "test" / "text").read_text().splitlines()
    words = dict(line.split(maxsplit=1) for line in text)[utt]
    ids = sorted(files)
    (data / "wav.scp").write_text("".join(f"{u} {files[u]}\n" for u in ids))
    (data / "text").write_text("".join(f"{u} {words}\n" for u in ids))
    (data / "utt2spk").write_text("".join(f"{u} {u}\n" for u in ids))
    (data / "spk2utt").write_text("".join(f"{u} {u}\n" for u in ids))
    return files


def test_other_rates_decode_as_the_original_or_are_refused(recipe, tmp_path):
    work = copy_recipe(recipe, tmp_path / "asr1", ignore=())
    utt, path = (work / "data" / "test" / "wav.scp").read_text().splitlines()[0].split(maxsplit=1)
    files = mixed_rate_set(work, utt, path)
    common = ["--asr_config", TINY, "--test_sets", "mixed", "--inference_args", FAST_DECODING]
    run_recipe(work, "--stage", "2", "--stop_stage", "2", *common)
    dumped = dict(line.split(maxsplit=1) for line in
                  (work / "dump/raw/mixed/wav.scp").read_text().splitlines())
    assert dumped[f"{utt}-8k"] == path  # at --fs already: as it is
    for name in RATES:
        wave, rate = soundfile.read(dumped[f"{utt}-{name}"])
        assert rate == 8000
    assert (work / "dump/raw/mixed/converted").read_text().count(" Hz") == 2
    run_recipe(work, "--stage", "8", "--stop_stage", "8", *common)
    hyps = dict(line.split(maxsplit=1) if " " in line else (line, "") for line in
                (work / ASR_EXP / DECODE / "mixed" / "text").read_text().splitlines())
    original = dict(line.split(maxsplit=1) if " " in line else (line, "") for line in
                    (recipe / ASR_EXP / DECODE / "test" / "text").read_text().splitlines())[utt]
    assert hyps == {u: original for u in files}

    refused = run_recipe(work, "--stage", "2", "--stop_stage", "2", "--resample", "false",
                         *common, check=False)
    assert refused.returncode != 0
    assert "data/mixed/wav.scp: 2 of 3 audio files are not at --fs 8000 Hz" in refused.stderr
    for name, rate in RATES.items():
        assert f"utterance '{utt}-{name}': {files[f'{utt}-{name}']} is {rate} Hz" in refused.stderr
