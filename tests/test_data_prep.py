"""LibriSpeech preparation: the real mini corpus when present, synthetic corpora for the rest."""

import functools
import http.server
import os
import shutil
import socket
import subprocess
import tarfile
import threading

import pytest
import soundfile
from espnet2.fileio.sound_scp import SoundScpReader

from dataprep_helpers import REPO, find_shared, make_librispeech, run_recipe_script, snapshot
from espnet_plugin.cli import UserError
from espnet_plugin.recipe.kaldi_data import (
    DataDirExistsError,
    read_data_dir,
)
from espnet_plugin.recipe.librispeech import main, prepare

MINI = find_shared("data/LibriSpeech-mini")
needs_mini = pytest.mark.skipif(MINI is None, reason="no shared/data/LibriSpeech-mini here")

SYNTHETIC = {
    # Speakers 61 and 610: "61-..." < "610-..." and "61" < "610" must agree in C order.
    "61-70968-0000": ("HE BEGAN A CONFUSED COMPLAINT", 0.5),
    "61-70968-0001": ("AGAINST THE WIZARD'S HOUSE", 0.3),
    "610-1234-0000": ("A  TRANSCRIPT  WITH  DOUBLE SPACES", 0.4),
    "610-99-0000": ("ANOTHER CHAPTER", 0.2),
}


@needs_mini
@pytest.mark.parametrize("inner", [False, True], ids=["parent-dir", "LibriSpeech-dir"])
def test_real_mini_corpus(tmp_path, inner):
    corpus = MINI / "LibriSpeech" if inner else MINI
    out = prepare(corpus, tmp_path / "data", ["dev-clean", "test-clean"])
    assert out == {
        "dev-clean": tmp_path / "data/dev_clean",
        "test-clean": tmp_path / "data/test_clean",
    }
    for split in ("dev-clean", "test-clean"):
        data = read_data_dir(out[split])
        flacs = sorted((MINI / "LibriSpeech" / split).rglob("*.flac"))
        assert data.utts == [f.stem for f in flacs]
        lines = [
            line.split(" ", 1)
            for trans in (MINI / "LibriSpeech" / split).rglob("*.trans.txt")
            for line in trans.read_text().splitlines()
        ]
        assert data.text == dict(lines)
        assert all(data.utt2spk[utt] == utt.split("-")[0] for utt in data.utts)
        reader = SoundScpReader(str(out[split] / "wav.scp"), dtype="float32")
        for utt, flac in zip(data.utts, flacs):
            rate, wave = reader[utt]
            assert rate == 16000 and len(wave) == soundfile.info(flac).frames
    # The corpus README's table: dev-clean has 10 utterances of 3 speakers, 57.8 s.
    dev = read_data_dir(out["dev-clean"])
    assert len(dev.utts) == 10 and len(dev.spk2utt()) == 3
    seconds = sum(soundfile.info(path).duration for path in dev.wav_scp.values())
    assert seconds == pytest.approx(57.8, abs=0.05)


def test_synthetic_corpus_and_idempotent_rerun(tmp_path):
    make_librispeech(tmp_path / "corpus", "dev-other", SYNTHETIC)
    prepare(tmp_path / "corpus", tmp_path / "data", ["dev-other"])
    data_dir = tmp_path / "data" / "dev_other"
    data = read_data_dir(data_dir)
    assert data.utts == sorted(SYNTHETIC)
    assert data.text["610-1234-0000"] == "A TRANSCRIPT WITH DOUBLE SPACES"
    assert data.spk2utt() == {
        "61": ["61-70968-0000", "61-70968-0001"],
        "610": ["610-1234-0000", "610-99-0000"],
    }
    for name in ("wav.scp", "text", "utt2spk", "spk2utt"):
        assert subprocess.run(["sort", "-c", data_dir / name], env={"LC_ALL": "C"}).returncode == 0

    before = snapshot(data_dir)
    prepare(tmp_path / "corpus", tmp_path / "data", ["dev-other"])
    assert snapshot(data_dir) == before

    # The corpus changed: the finished data dir is kept unless --overwrite.
    trans = tmp_path / "corpus/LibriSpeech/dev-other/610/99/610-99.trans.txt"
    trans.write_text("610-99-0000 A NEW TRANSCRIPT\n")
    with pytest.raises(DataDirExistsError, match=r"dev_other already holds a different data dir"):
        prepare(tmp_path / "corpus", tmp_path / "data", ["dev-other"])
    assert snapshot(data_dir) == before
    prepare(tmp_path / "corpus", tmp_path / "data", ["dev-other"], overwrite=True)
    assert read_data_dir(data_dir).text["610-99-0000"] == "A NEW TRANSCRIPT"


def test_combined_set_needs_its_parts(tmp_path):
    make_librispeech(tmp_path, "dev-clean", SYNTHETIC)
    with pytest.raises(UserError, match=r"--combine dev=dev-clean,dev-other: .*--splits"):
        prepare(
            tmp_path, tmp_path / "data", ["dev-clean"], combined={"dev": ["dev-clean", "dev-other"]}
        )
    assert not (tmp_path / "data").exists()


def test_missing_corpus_dir_names_the_option(tmp_path):
    with pytest.raises(UserError, match=r"--librispeech_dir .*/nowhere does not exist"):
        prepare(tmp_path / "nowhere", tmp_path / "data", ["dev-clean"])


def test_missing_split_names_what_was_looked_for(tmp_path):
    make_librispeech(tmp_path, "dev-clean", SYNTHETIC)
    with pytest.raises(
            match=r"'test-clean' not found: looked for .*/LibriSpeech/test-clean \(--librispeech_dir",
    ):
        prepare(tmp_path, tmp_path / "data", ["dev-clean", "test-clean"])


def test_transcript_line_without_audio(tmp_path):
    split = make_librispeech(tmp_path, "dev-clean", SYNTHETIC)
    (split / "61/70968/61-70968-0001.flac").unlink()
    with pytest.raises(
            match=r"61-70968.trans.txt:2: transcript line for '61-70968-0001' has no audio file",
    ):
        prepare(tmp_path, tmp_path / "data", ["dev-clean"])
    assert not (tmp_path / "data").exists()


def test_unreadable_audio_names_the_file(tmp_path):
    split = make_librispeech(tmp_path, "dev-clean", SYNTHETIC)
    (split / "610/99/610-99-0000.flac").write_bytes(b"not a flac file")
    with pytest.raises(UserError, match=r"cannot read audio file .*610-99-0000.flac"):
        prepare(tmp_path, tmp_path / "data", ["dev-clean"])


def test_empty_transcript_names_file_and_line(tmp_path):
    split = make_librispeech(tmp_path, "dev-clean", SYNTHETIC)
    (split / "61/70968/61-70968.trans.txt").write_text("61-70968-0000 HE BEGAN\n61-70968-0001\n")
    with pytest.raises(UserError, match=r"61-70968.trans.txt:2: .*has an empty transcript"):
        prepare(tmp_path, tmp_path / "data", ["dev-clean"])


def test_missing_transcript_file(tmp_path):
    split = make_librispeech(tmp_path, "dev-clean", SYNTHETIC)
    (split / "610/1234/610-1234.trans.txt").unlink()
    with pytest.raises(
        UserError, match=r"610/1234: transcript file 610-1234.trans.txt is missing"
    ):
        prepare(tmp_path, tmp_path / "data", ["dev-clean"])


@pytest.fixture
def corpus_server(tmp_path, monkeypatch):
    """A local HTTP server holding ``dev-clean.tar.gz`` laid out like openslr's archive."""
    make_librispeech(tmp_path / "build", "dev-clean", SYNTHETIC)
    (tmp_path / "build/LibriSpeech/SPEAKERS.TXT").write_text("; speakers\n")
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "dev-clean.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "build/LibriSpeech", arcname="LibriSpeech")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_download_extracts_missing_split_and_reuses_archive(tmp_path, corpus_server):
    corpus = tmp_path / "corpus"
    prepare(
        corpus,
        tmp_path / "data",
        ["dev-clean"],
        download=True,
        download_dir=tmp_path / "archives",
        url_base=corpus_server,
    )
    assert (tmp_path / "archives/dev-clean.tar.gz").is_file()
    assert (corpus / "LibriSpeech/SPEAKERS.TXT").is_file()
    assert read_data_dir(tmp_path / "data/dev_clean").utts == sorted(SYNTHETIC)
    assert [p.name for p in corpus.iterdir()] == ["LibriSpeech"]  # no scratch folder left

    # Split gone, network gone: the kept archive is extracted again.
    shutil.rmtree(corpus / "LibriSpeech/dev-clean")
    prepare(
        corpus,
        tmp_path / "data",
        ["dev-clean"],
        download=True,
        download_dir=tmp_path / "archives",
        url_base="http://127.0.0.1:9",
    )
    assert (corpus / "LibriSpeech/dev-clean/61/70968/61-70968-0000.flac").is_file()


def test_unreachable_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    with pytest.raises(
        UserError, match=r"cannot download http://127.0.0.1:\d+/dev-clean.tar.gz: .*network"
    ):
        prepare(
            tmp_path / "corpus",
            tmp_path / "data",
            ["dev-clean"],
            download=True,
            url_base=f"http://127.0.0.1:{closed_port}",
        )
    assert not list((tmp_path / "corpus").glob("*.tar.gz"))


def test_recipe_data_sh(tmp_path):
    script = "librispeech_100/asr1/local/data.sh"
    assert os.access(REPO / "egs2" / script, os.X_OK)
    splits = ("train-clean-100", "dev-clean", "dev-other", "test-clean", "test-other")
    for i, split in enumerate(splits):
        make_librispeech(tmp_path / "corpus", split, {f"{i + 1}-{i}-0000": ("WORDS", 0.2)})
    result = run_recipe_script(script, ["--librispeech_dir", tmp_path / "corpus"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for i, split in enumerate(splits):
        assert read_data_dir(tmp_path / "data" / split.replace("-", "_")).utts == [
            f"{i + 1}-{i}-0000"
        ]
    assert read_data_dir(tmp_path / "data/dev").utts == ["2-1-0000", "3-2-0000"]
