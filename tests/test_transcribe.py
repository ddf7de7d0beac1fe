"""Sharing a trained model: asr.sh stage 12's zip, loaded elsewhere by the transcribe command, the
Transcriber and ESPnet's own Speech2Text; long audio in windows or at silences; stage 13's upload
(Hugging Face's HfApi replaced at the network boundary)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile
import yaml

from conftest import ASR_EXP, DECODE, FAST_DECODING, TEMPLATE_ASR, TINY
from espnet_plugin.cli import UserError
from espnet_plugin.packed import CHECKSUMS, verify
from espnet_plugin.transcribe import Word, join_windows, silence_spans, window_spans

ZIP = f"{ASR_EXP}/packed/{ASR_EXP.split('/asr_', 1)[1]}.zip"
LONG = "allison-basic-pbx-ivr-main"  # 25.4 s, the test set's longest prompt
WHOLE = ["--max_seconds", "30"]  # decode every test prompt whole, as stage 8 does


def table(path: Path) -> dict:
    return {k: v.split() for k, _, v in (line.partition(" ") for line in
                                         path.read_text().splitlines())}


# ---- long audio: the pieces and their joining, on hand-made values ----


def test_windows_cover_the_audio_with_the_overlap():
    assert window_spans(25.0, 10.0, 4.0) == [(0, 10), (6, 16), (12, 22), (15, 25)]
    assert window_spans(8.0, 10.0, 4.0) == [(0, 8)]


def test_each_word_comes_from_the_window_that_holds_its_middle():
    # Window 1 [0, 10] and 2 [6, 16] overlap in [6, 10]: the cut is at 8. "two" (middle 7.3) is
    # window 1's, "three" (middle 9) window 2's; window 1's cut-off "thr" and window 2's partial
    # "wo" (middle 6.2) are dropped.
    first = [Word("one", 1, 2), Word("two", 7.0, 7.6), Word("thr", 9.4, 10.0)]
    second = [Word("wo", 6.0, 6.4), Word("two", 7.0, 7.6), Word("three", 8.5, 9.5),
              Word("four", 12, 13)]
    joined = join_windows([(0, 10, first), (6, 16, second)])
    assert [w.text for w in joined] == ["one", "two", "three", "four"]
    assert joined[1] is first[1] and joined[2] is second[2]


def test_silence_splits_in_the_longest_pause():
    fs = 8000
    rng = np.random.default_rng(0)
    speech = lambda s: rng.uniform(-0.5, 0.5, int(s * fs)).astype(np.float32)  # noqa: E731
    quiet = lambda s: np.zeros(int(s * fs), np.float32)  # noqa: E731
    wave = np.concatenate([speech(5.5), quiet(0.2), speech(0.3), quiet(1.0), speech(5)])
    spans = silence_spans(wave, fs, 10.0)
    assert spans == [(0, pytest.approx(6.5)), (pytest.approx(6.5), 12.0)]  # the 1 s pause
    # No pause at all: cut at every 10 s.
    cuts = silence_spans(speech(25), fs, 10.0)
    assert [(round(a, 2), round(b, 2)) for a, b in cuts] == [(0, 10), (10, 20), (20, 25)]


# ---- stage 12's zip ----


def test_stage_12_packs_a_verified_zip_with_relative_paths(recipe):
    path = recipe / ZIP
    verify(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        listed = dict(reversed(line.split("  ")) for line in
                      archive.read(CHECKSUMS).decode().splitlines())
        assert listed == {n: hashlib.sha256(archive.read(n)).hexdigest()
                          for n in names if n != CHECKSUMS}
        meta = yaml.safe_load(archive.read("meta.yaml"))
        for name in [*meta["yaml_files"].values(), f"{ASR_EXP}/decode.yaml"]:
            strings = []
            collect = lambda v: ([collect(x) for x in v.values()] if isinstance(v, dict) else  # noqa: E731
                                 [collect(x) for x in v] if isinstance(v, list) else strings.append(v))
            collect(yaml.safe_load(archive.read(name)))
            assert not [s for s in strings if isinstance(s, str) and os.path.isabs(s)], name
        card = archive.read("README.md").decode()
        decode = yaml.safe_load(archive.read(f"{ASR_EXP}/decode.yaml"))
    assert all(not os.path.isabs(n) for n in names)
    for needed in ("exp/asr_stats_raw_en_char_sp_", "data/en_token_list/char/tokens.txt",
                   f"{ASR_EXP}/RESULTS.md", f"{ASR_EXP}/config.yaml"):
        assert any(n.startswith(needed) for n in names), needed
    wer = json.loads((recipe / ASR_EXP / DECODE / "test/score_word/result.json").read_text())
    assert f"|test|{wer['num_utts']}|{wer['ref_len']}|" in card
    assert decode["beam_size"] == 1 and decode["maxlenratio"] == 0.1  # stage 8's options


def test_stage_12_refuses_a_stale_experiment(recipe, tmp_path):
    work = tmp_path / "asr1"
    shutil.copytree(recipe, work, symlinks=True, ignore=shutil.ignore_patterns("downloads"))
    tokens = work / "data/en_token_list/char/tokens.txt"
    tokens.write_text(tokens.read_text() + "extra\n")
    result = subprocess.run(
        ["bash", "run.sh", "--asr_config", TINY, "--test_sets", "test", "--inference_args",
         FAST_DECODING, "--stage", "12", "--stop_stage", "12"],
        cwd=work, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"))
    assert result.returncode != 0
    assert (f"{ASR_EXP} is unfinished or stale: data/en_token_list/char/tokens.txt has changed "
            f"since {ASR_EXP} was made") in result.stderr


# ---- the zip on another machine: the transcribe command ----


@pytest.fixture(scope="module")
def elsewhere(recipe, tmp_path_factory):
    """The test prompts, a 16 kHz and a stereo copy of one and an empty file, transcribed from a
    copy of the zip while the recipe folder is renamed away: (folder, stdout, stderr, status)."""
    tmp = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(recipe / ZIP, tmp / "model.zip")
    scp = {}
    for key, path in ((k, v[0]) for k, v in table(recipe / "dump/raw/test/wav.scp").items()):
        scp[key] = tmp / f"{key}{Path(path).suffix}"
        shutil.copy(path, scp[key])
    utt = "allison-letters-a"
    wave, rate = soundfile.read(scp[utt], dtype="float64")
    scp["copy-16k"] = tmp / "copy-16k.wav"
    soundfile.write(scp["copy-16k"], np.clip(scipy.signal.resample_poly(wave, 2, 1), -1, 1),
                    2 * rate, subtype="PCM_16")
    scp["copy-stereo"] = tmp / "copy-stereo.wav"
    soundfile.write(scp["copy-stereo"], np.stack([wave, wave], 1), rate, subtype="PCM_16")
    scp["empty"] = tmp / "empty.wav"
    soundfile.write(scp["empty"], np.zeros(0), rate)
    (tmp / "wav.scp").write_text("".join(f"{k} {v}\n" for k, v in scp.items()))
    away = recipe.with_name(recipe.name + ".away")
    recipe.rename(away)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "espnet_plugin.bin.transcribe", "--model", "model.zip",
             "--unpack_dir", "unpacked", "--wav_scp", "wav.scp", *WHOLE],
            cwd=tmp, capture_output=True, text=True, timeout=600)
    finally:
        away.rename(recipe)
    return tmp, result.stdout, result.stderr, result.returncode


def test_unpacked_elsewhere_it_transcribes_as_stage_8(recipe, elsewhere):
    tmp, stdout, stderr, status = elsewhere
    hyps = {k: v.split() for k, _, v in (line.partition(" ") for line in stdout.splitlines())}
    stage_8 = table(recipe / ASR_EXP / DECODE / "test/text")
    assert {k: hyps[k] for k in stage_8} == stage_8, stderr[-2000:]
    unpacked = (tmp / "unpacked" / ASR_EXP / "config.yaml").read_text()
    assert str(recipe) not in unpacked and str(tmp / "unpacked") in unpacked


def test_other_rates_and_channels_give_the_original_hypothesis(elsewhere):
    _, stdout, stderr, _ = elsewhere
    hyps = {k: v for k, _, v in (line.partition(" ") for line in stdout.splitlines())}
    assert hyps["copy-16k"] == hyps["copy-stereo"] == hyps["allison-letters-a"], stderr[-2000:]


def test_an_empty_file_is_named_and_the_others_transcribed(elsewhere):
    tmp, stdout, stderr, status = elsewhere
    assert status == 1
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert errors == [
        f"espnet_plugin.bin.transcribe: error: {tmp / 'empty.wav'}: the audio file is empty "
        "(0 samples)",
        "espnet_plugin.bin.transcribe: error: 1 of 42 files could not be transcribed (named above)",
    ]
    assert len(stdout.splitlines()) == 41


def test_a_tampered_zip_is_refused(recipe, tmp_path):
    tampered = tmp_path / "model.zip"
    with zipfile.ZipFile(recipe / ZIP) as source, zipfile.ZipFile(tampered, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("decode.yaml"):
                data = data.replace(b"beam_size: 1", b"beam_size: 9")
            target.writestr(info, data)
    result = subprocess.run(
        [sys.executable, "-m", "espnet_plugin.bin.transcribe", "--model", str(tampered),
         "--unpack_dir", str(tmp_path / "unpacked"), "x.wav"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"espnet_plugin.bin.transcribe: error: {tampered}: {ASR_EXP}/decode.yaml does not match "
        "its checksum: the file was changed after packing or the download is damaged")
    assert not (tmp_path / "unpacked").exists()


def test_a_model_folder_without_weights_is_refused(recipe, tmp_path):
    from espnet_plugin.packed import model_files

    (tmp_path / "config.yaml").write_text((recipe / ASR_EXP / "config.yaml").read_text())
    with pytest.raises(UserError, match=f"--model {tmp_path}: no weights "
                                        f"{tmp_path / 'valid.acc.ave.pth'}"):
        model_files(tmp_path)


# ---- the Python API and ESPnet's own Speech2Text ----


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("unpacked")


@pytest.fixture(scope="module")
def transcriber(recipe, unpacked):
    from espnet_plugin import Transcriber

    return Transcriber.from_pretrained(recipe / ZIP, unpack_dir=unpacked, max_seconds=30.0)


def test_the_transcriber_and_espnets_speech2text_agree_with_stage_8(recipe, transcriber,
                                                                    unpacked):
    from espnet2.bin.asr_inference import Speech2Text

    from espnet_plugin.packed import unpack_zip

    stage_8 = table(recipe / ASR_EXP / DECODE / "test/text")
    path = table(recipe / "dump/raw/test/wav.scp")["allison-demo-abouttotry"][0]
    assert transcriber(path).split() == stage_8["allison-demo-abouttotry"]
    files = unpack_zip(recipe / ZIP, unpacked)  # as the transcriber unpacked it
    speech2text = Speech2Text(**files, beam_size=1, maxlenratio=0.1, ctc_weight=0.7,
                              lm_weight=0.0, penalty=0.0)
    text = speech2text(soundfile.read(path, dtype="float32")[0])[0][0]
    assert text.split() == stage_8["allison-demo-abouttotry"]


def test_a_long_prompt_in_windows_reads_close_to_its_whole_decode(recipe, transcriber):
    from espnet_plugin.recipe.score import score

    path = table(recipe / "dump/raw/test/wav.scp")[LONG][0]
    (whole,) = transcriber.transcribe([(LONG, path)], words=True)
    transcriber.max_seconds = 10.0
    try:
        (windowed,) = transcriber.transcribe([(LONG, path)], words=True)
    finally:
        transcriber.max_seconds = 30.0
    assert len(windowed.words) == len(windowed.text.split())
    assert all(a.start <= b.start for a, b in zip(windowed.words, windowed.words[1:]))
    assert windowed.words[-1].end <= windowed.seconds
    distance = score({LONG: whole.text}, {LONG: windowed.text}).error_rate
    assert distance <= 20, (whole.text, windowed.text)


# ---- stage 13 ----


def run_stage_13(recipe: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(TEMPLATE_ASR), "--train_set", "train", "--valid_set", "dev", "--test_sets",
         "test", "--token_type", "char", "--speed_perturb_factors", "0.9 1.0 1.1", "--asr_config",
         TINY, "--stage", "13", *args], cwd=recipe, capture_output=True, text=True, timeout=300,
        env=dict(env or os.environ, PATH=path))


def test_stage_13_is_skipped_without_a_repository(recipe):
    result = run_stage_13(recipe)
    assert result.returncode == 0, result.stderr
    assert "Stage 13: skipped: no --hf_repo" in result.stdout


def test_stage_13_uploads_the_unpacked_zip(recipe, tmp_path):
    calls = tmp_path / "calls.jsonl"
    (tmp_path / "sitecustomize.py").write_text(f"""
import json
import huggingface_hub

def record(name):
    def method(self, **kwargs):
        kwargs["files"] = sorted(str(p.relative_to(kwargs["folder_path"])) for p in
                                 __import__("pathlib").Path(kwargs["folder_path"]).rglob("*")
                                 if p.is_file()) if "folder_path" in kwargs else None
        with open({str(calls)!r}, "a") as f:
            f.write(json.dumps(dict(kwargs, method=name)) + "\\n")
    return method

huggingface_hub.HfApi.create_repo = record("create_repo")
huggingface_hub.HfApi.upload_folder = record("upload_folder")
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = run_stage_13(recipe, "--hf_repo", "someone/tiny", env=env)
    assert result.returncode == 0, result.stderr
    create, upload = [json.loads(line) for line in calls.read_text().splitlines()]
    assert create["method"] == "create_repo" and create["repo_id"] == "someone/tiny"
    assert upload["method"] == "upload_folder" and upload["repo_id"] == "someone/tiny"
    assert Path(upload["folder_path"]) == (recipe / ZIP).parent / "hf"
    with zipfile.ZipFile(recipe / ZIP) as archive:
        assert upload["files"] == sorted(archive.namelist())
