"""format_data: lengths, duration/empty-text filtering and speed perturbation written to disk."""

import logging
from fractions import Fraction

import numpy as np
import pytest
import soundfile
from espnet2.train.dataset import ESPnetDataset

from dataprep_helpers import find_shared, snapshot, write_tone
from espnet_plugin.recipe.format_data import format_data, parse_factors
from espnet_plugin.cli import UserError
from espnet_plugin.recipe.kaldi_data import (
    DataDir,
    DataDirExistsError,
    read_data_dir,
)
from espnet_plugin.recipe.librispeech import prepare

MINI = find_shared("data/LibriSpeech-mini")
RATE = 16000


def tone_data_dir(tmp_path, seconds: dict[str, float], freq=1000.0, empty=()):
    """A data dir of sine tones; ``seconds`` maps utterance ids (``spk-n``) to durations."""
    wav_scp, lengths = {}, {}
    for utt, secs in seconds.items():
        path = tmp_path / "audio" / f"{utt}.wav"
        lengths[utt] = write_tone(path, secs, RATE, freq)
        wav_scp[utt] = str(path)
    data = DataDir(
        wav_scp=wav_scp,
        text={u: "" if u in empty else f"WORDS OF {u.upper()}" for u in seconds},
        utt2spk={u: u.split("-")[0] for u in seconds},
    )
    # An empty transcript is valid input to format_data; write the files directly.
    src = tmp_path / "src"
    src.mkdir()
    for name, content in data.render().items():
        (src / name).write_text(content)
    return src, lengths


def test_lengths_and_filters(tmp_path, caplog):
    src, lengths = tone_data_dir(
        tmp_path, {"a-1": 0.05, "a-2": 0.5, "b-1": 1.0, "b-2": 3.0, "b-3": 0.7}, empty={"b-3"}
    )
    with caplog.at_level(logging.INFO):
        out = format_data(src, tmp_path / "dst", min_dur=0.1, max_dur=2.0)
    assert out.utts == ["a-2", "b-1"]
    written = read_data_dir(tmp_path / "dst")
    assert written.utt2num_samples == {"a-2": lengths["a-2"], "b-1": lengths["b-1"]}
    assert written.wav_scp == {u: str(tmp_path / "audio" / f"{u}.wav") for u in ("a-2", "b-1")}
    assert written.spk2utt() == {"a": ["a-2"], "b": ["b-1"]}
    assert "dropped 1 utterances with an empty transcript: ['b-3']" in caplog.text
    assert "dropped 1 utterances shorter than --min_dur 0.1 s: ['a-1']" in caplog.text
    assert "dropped 1 utterances longer than --max_dur 2.0 s: ['b-2']" in caplog.text
    assert not (tmp_path / "dst" / "audio").exists()


def dominant_frequency(path):
    wave, rate = soundfile.read(path)
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.argmax(spectrum) * rate / len(wave)


def test_speed_perturbation_scales_length_and_pitch(tmp_path):
    src, lengths = tone_data_dir(tmp_path, {"a-1": 1.0, "a-2": 1.3, "b-1": 0.77}, freq=1000.0)
    out = format_data(src, tmp_path / "dst", 0.1, 20.0, parse_factors("0.9 1.0 1.1"))
    assert len(out.utts) == 9
    for factor in (0.9, 1.1):
        for utt, num_samples in lengths.items():
            new = f"sp{factor}-{utt}"
            info = soundfile.info(out.wav_scp[new])
            assert info.samplerate == RATE
            assert info.frames == out.utt2num_samples[new]
            assert abs(info.frames - num_samples / factor) <= 1
            assert out.utt2spk[new] == f"sp{factor}-{utt.split('-')[0]}"
            assert out.text[new] == out.text[utt]
            # sox-style speed change: a 1 kHz tone played 1.1x faster sounds at 1.1 kHz.
            assert dominant_frequency(out.wav_scp[new]) == pytest.approx(1000 * factor, abs=3)
    assert out.wav_scp["a-1"] == str(tmp_path / "audio/a-1.wav")  # originals are not copied

    # ESPnet's own dataset reads the formatted dir, perturbed audio included.
    dataset = ESPnetDataset([(str(tmp_path / "dst/wav.scp"), "speech", "sound")])
    _, item = dataset["sp0.9-b-1"]
    assert len(item["speech"]) == out.utt2num_samples["sp0.9-b-1"]

    # Several worker processes write the same files.
    parallel = format_data(src, tmp_path / "dst2", 0.1, 20.0, parse_factors("0.9 1.0 1.1"), nj=2)
    for utt in out.utts:
        a, b = (soundfile.read(d.wav_scp[utt])[0] for d in (out, parallel))
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(MINI is None, reason="no shared/data/LibriSpeech-mini here")
def test_speed_perturbation_of_real_speech(tmp_path):
    prepare(MINI, tmp_path / "data", ["test-clean"])
    out = format_data(
        tmp_path / "data/test_clean", tmp_path / "dump", 0.1, 20.0, parse_factors("0.9 1.1")
    )
    originals = {
        f.stem: soundfile.info(f).frames for f in (MINI / "LibriSpeech/test-clean").rglob("*.flac")
    }
    assert sorted(out.utts) == sorted(f"sp{f}-{u}" for f in (0.9, 1.1) for u in originals)
    for utt, path in out.wav_scp.items():
        factor, original = float(utt[2:5]), utt[6:]
        frames = soundfile.info(path).frames
        assert frames == out.utt2num_samples[utt]
        assert abs(frames - originals[original] / factor) <= 1


def test_rerun_is_idempotent_and_never_clobbers(tmp_path):
    src, _ = tone_data_dir(tmp_path, {"a-1": 0.5, "a-2": 1.5})
    factors = parse_factors("0.9 1.0")
    format_data(src, tmp_path / "dst", 0.1, 20.0, factors)
    before = snapshot(tmp_path / "dst")
    format_data(src, tmp_path / "dst", 0.1, 20.0, factors)
    assert snapshot(tmp_path / "dst") == before

    with pytest.raises(DataDirExistsError, match=r"dst already holds different .*--overwrite"):
        format_data(src, tmp_path / "dst", 0.1, 1.0, factors)
    assert snapshot(tmp_path / "dst") == before

    # A perturbed file that is not what this run would write is not replaced either.
    perturbed = tmp_path / "dst/audio/sp0.9/a-1.flac"
    write_tone(perturbed, 0.2)
    changed = snapshot(tmp_path / "dst")
    with pytest.raises(DataDirExistsError, match=r"sp0.9/a-1.flac"):
        format_data(src, tmp_path / "dst", 0.1, 20.0, factors)
    assert snapshot(tmp_path / "dst") == changed

    format_data(src, tmp_path / "dst", 0.1, 20.0, factors, overwrite=True)
    assert abs(soundfile.info(perturbed).frames - 0.5 * RATE / 0.9) <= 1


def test_bad_options(tmp_path):
    src, _ = tone_data_dir(tmp_path, {"a-1": 0.5})
    with pytest.raises(UserError, match=r"--min_dur 2.0 / --max_dur 1.0"):
        format_data(src, tmp_path / "dst", 2.0, 1.0)
    with pytest.raises(UserError, match=r"--dst .* must differ from --src"):
        format_data(src, src, 0.1, 20.0)
    with pytest.raises(UserError, match=r"--nj 0"):
        format_data(src, tmp_path / "dst", 0.1, 20.0, nj=0)
    for spec in ("0.9 fast", "0 1.0", "1.0 1", ""):
        with pytest.raises(UserError, match="--speed_perturb_factors"):
            parse_factors(spec)
    assert parse_factors("0.9 1.0 1.1") == [Fraction(9, 10), 1, Fraction(11, 10)]


def test_bad_source_dirs(tmp_path):
    src, _ = tone_data_dir(tmp_path, {"a-1": 0.5, "a-2": 0.6})
    (tmp_path / "audio/a-2.wav").write_bytes(b"broken")
    with pytest.raises(UserError, match=r"(?s)wav.scp: 1 of 2 audio files .*utterance 'a-2': "
                                         r"cannot read audio file .*a-2.wav"):
        format_data(src, tmp_path / "dst", 0.1, 20.0)
    (src / "text").unlink()
    with pytest.raises(UserError, match=r"missing file .*src/text"):
        format_data(src, tmp_path / "dst", 0.1, 20.0)
    assert not (tmp_path / "dst").exists()


def test_default_keeps_every_utterance(tmp_path):
    # asr.sh formats test sets without limits: long and short utterances must all stay.
    src, lengths = tone_data_dir(tmp_path, {"a-1": 0.02, "a-2": 31.0})
    assert format_data(src, tmp_path / "dst").utt2num_samples == lengths


def truncated_flac(path, seconds: float) -> int:
    """A FLAC file whose last part is missing, as a copy killed midway leaves it: its header
    still gives the full length. Returns that length."""
    wave = np.sin(np.arange(int(seconds * RATE)) * 0.05).astype("float32")
    soundfile.write(path, wave, RATE, format="FLAC")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(wave)


@pytest.mark.parametrize("nj", [1, 2])
def test_audio_cut_short_is_found_by_utterance_and_path(tmp_path, nj):
    src, _ = tone_data_dir(tmp_path, {"a-1": 0.5, "a-2": 0.6, "b-1": 0.7})
    samples = truncated_flac(tmp_path / "audio" / "a-2.flac", 2.0)
    (src / "wav.scp").write_text((src / "wav.scp").read_text().replace("a-2.wav", "a-2.flac"))
    assert soundfile.info(tmp_path / "audio" / "a-2.flac").frames == samples  # header intact
    with pytest.raises(UserError, match=r"(?s)1 of 3 audio files.*utterance 'a-2': "
                                        r"cannot read audio file .*a-2.flac: .*lost sync"):
        format_data(src, tmp_path / "dst", 0.1, 20.0, parse_factors("0.9 1.0"), nj=nj)
    assert not (tmp_path / "dst").exists()


def test_empty_and_too_short_audio_in_a_test_set(tmp_path, caplog):
    """A test set keeps every utterance (no --min_dur), but a 0-sample file or one shorter than
    --min_audio_dur cannot be decoded: named, then failed or dropped as asked."""
    src, _ = tone_data_dir(tmp_path, {"a-1": 0.5, "a-2": 0.04, "b-1": 0.7})
    soundfile.write(tmp_path / "audio" / "b-1.wav", np.zeros(0, "float32"), RATE)
    with pytest.raises(UserError) as error:
        format_data(src, tmp_path / "dst", min_audio_dur=0.1)
    message = str(error.value)
    assert "2 of 3 audio files cannot be used" in message
    assert "utterance 'a-2': " in message and "0.040 s long, shorter than --min_audio_dur" in message
    assert "utterance 'b-1': " in message and "b-1.wav is empty (0 samples)" in message
    with caplog.at_level(logging.WARNING):
        out = format_data(src, tmp_path / "dst", min_audio_dur=0.1, bad_audio="drop")
    assert out.utts == ["a-1"]
    assert "dropped 2 unusable audio files" in caplog.text


def voiced(rate: int, seconds: float = 1.0) -> np.ndarray:
    """A vowel-like sound (a gliding 120-180 Hz pitch, harmonics up to 3.5 kHz), the same
    waveform evaluated at any ``rate``: a reference for conversion that no resampler made."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (120 * t + 30 * t**2)
    f0 = 120 + 60 * t
    wave = sum(np.sin(k * phase) / k for k in range(1, 30) if np.all(k * f0 < 3500))
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def rates_data_dir(tmp_path, files: dict[str, tuple[int, int]]):
    """A data dir whose utterance ``utt`` is :func:`voiced` at ``files[utt] = (rate, channels)``."""
    lines = []
    for utt, (rate, channels) in sorted(files.items()):
        path = tmp_path / "audio" / f"{utt}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, np.repeat(voiced(rate)[:, None], channels, axis=1), rate,
                        subtype="PCM_16")
        lines.append(f"{utt} {path}")
    src = tmp_path / "src"
    src.mkdir()
    (src / "wav.scp").write_text("".join(f"{line}\n" for line in lines))
    (src / "text").write_text("".join(f"{u} A WORD\n" for u in sorted(files)))
    (src / "utt2spk").write_text("".join(f"{u} {u.split('-')[0]}\n" for u in sorted(files)))
    (src / "spk2utt").write_text(f"a {' '.join(sorted(files))}\n")
    return src


def test_other_rates_and_channels_are_brought_to_fs_and_mono(tmp_path, caplog):
    """16 kHz, 44.1 kHz and stereo files in an 8 kHz set come out as the 8 kHz original; the
    8 kHz mono file is listed as it is, not copied."""
    files = {"a-8k": (8000, 1), "a-16k": (16000, 1), "a-44k": (44100, 1), "a-stereo": (8000, 2)}
    src = rates_data_dir(tmp_path, files)
    original_bytes = (tmp_path / "audio" / "a-8k.wav").read_bytes()
    with caplog.at_level(logging.INFO):
        out = format_data(src, tmp_path / "dst", fs=8000)
    assert out.wav_scp["a-8k"] == str(tmp_path / "audio" / "a-8k.wav")
    assert (tmp_path / "audio" / "a-8k.wav").read_bytes() == original_bytes
    reference = voiced(8000)
    for utt in ("a-16k", "a-44k", "a-stereo"):
        assert out.wav_scp[utt] == str((tmp_path / "dst" / "audio" / "converted" / f"{utt}.flac"))
        wave, rate = soundfile.read(out.wav_scp[utt], dtype="float32")
        assert rate == 8000 and wave.ndim == 1
        assert len(wave) == out.utt2num_samples[utt] == len(reference)
        inner = slice(100, -100)  # the resampler's filter sees past the ends of the file
        error = wave[inner] - reference[inner]
        snr = 10 * np.log10(np.sum(reference[inner] ** 2) / np.sum(error**2))
        assert np.corrcoef(wave[inner], reference[inner])[0, 1] > 0.999 and snr > 30, (utt, snr)
    assert (tmp_path / "dst" / "converted").read_text().splitlines() == [
        f"a-16k {tmp_path}/audio/a-16k.wav 16000 Hz",
        f"a-44k {tmp_path}/audio/a-44k.wav 44100 Hz",
        f"a-stereo {tmp_path}/audio/a-stereo.wav 8000 Hz, 2 channels",
    ]
    assert "converting 3 utterances to 8000 Hz mono" in caplog.text
    # A re-run writes nothing again, and data at --fs leaves no record of conversions.
    mtime = (tmp_path / "dst" / "audio" / "converted" / "a-44k.flac").stat().st_mtime_ns
    assert format_data(src, tmp_path / "dst", fs=8000) == out
    assert (tmp_path / "dst" / "audio" / "converted" / "a-44k.flac").stat().st_mtime_ns == mtime


def test_speed_perturbation_of_another_rate_is_one_resampling(tmp_path):
    src = rates_data_dir(tmp_path, {"a-44k": (44100, 1)})
    out = format_data(src, tmp_path / "dst", 0.1, 20.0, parse_factors("0.9 1.0"), fs=8000)
    wave, rate = soundfile.read(out.wav_scp["sp0.9-a-44k"], dtype="float32")
    assert rate == 8000 and len(wave) == out.utt2num_samples["sp0.9-a-44k"] == -(-8000 * 10 // 9)
    # Played 0.9 times as fast: the sound sampled 8000 / 0.9 times a second, read at 8000.
    reference = voiced(8000 / 0.9)
    inner = slice(100, len(reference) - 100)
    assert np.corrcoef(wave[inner], reference[inner])[0, 1] > 0.999


def test_resample_false_refuses_other_rates_by_name(tmp_path):
    src = rates_data_dir(tmp_path, {"a-8k": (8000, 1), "a-16k": (16000, 1), "a-44k": (44100, 2)})
    with pytest.raises(UserError) as err:
        format_data(src, tmp_path / "dst", fs=8000, resample=False)
    assert str(err.value) == (
        f"{src}/wav.scp: 2 of 3 audio files are not at --fs 8000 Hz (--resample true converts "
        f"them):\n  utterance 'a-16k': {tmp_path}/audio/a-16k.wav is 16000 Hz"
        f"\n  utterance 'a-44k': {tmp_path}/audio/a-44k.wav is 44100 Hz"
    )
    assert not (tmp_path / "dst").exists()
