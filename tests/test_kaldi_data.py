import os
import subprocess

import pytest
from espnet2.fileio.read_text import read_2columns_text

from dataprep_helpers import snapshot, write_tone
from espnet_plugin.cli import UserError
from espnet_plugin.recipe.kaldi_data import (
    DataDir,
    DataDirExistsError,
    combine,
    read_data_dir,
    write_data_dir,
)


def two_speakers(tmp_path):
    # Ids chosen so that Python's code-point order and a careless sort could disagree:
    # "a-10" vs "a-9" (not numeric), "b-Z" vs "b-a" (upper before lower), "é" (non-ASCII, UTF-8).
    utts = {"b-a": "b", "a-9": "a", "a-10": "a", "b-Z": "b", "b-é": "b"}
    wav_scp = {}
    for utt in utts:
        wav_scp[utt] = str(tmp_path / "audio" / f"{utt}.wav")
        write_tone(tmp_path / "audio" / f"{utt}.wav", 0.2)
    return DataDir(wav_scp=wav_scp, text={u: f"WORDS OF {u.upper()}" for u in utts}, utt2spk=utts)


def only(data, utts):
    """The part of ``data`` with these utterances."""
    return DataDir(
        *({u: table[u] for u in utts} for table in (data.wav_scp, data.text, data.utt2spk))
    )


def test_written_files_are_c_sorted_and_read_back_by_espnet(tmp_path):
    data = two_speakers(tmp_path)
    assert write_data_dir(data, tmp_path / "d")
    for name in ("wav.scp", "text", "utt2spk", "spk2utt"):
        check = subprocess.run(["sort", "-c", tmp_path / "d" / name], env={"LC_ALL": "C"})
        assert check.returncode == 0, f"{name} is not in C-locale order"
    assert read_2columns_text(tmp_path / "d" / "text") == data.text
    assert read_2columns_text(tmp_path / "d" / "utt2spk") == data.utt2spk
    # spk2utt written by hand from the ids above, in C (byte) order.
    assert (tmp_path / "d" / "spk2utt").read_text() == "a a-10 a-9\nb b-Z b-a b-é\n"
    assert read_data_dir(tmp_path / "d") == data


def test_rewrite_is_a_no_op_and_different_data_is_refused(tmp_path):
    data = two_speakers(tmp_path)
    write_data_dir(data, tmp_path / "d")
    before = snapshot(tmp_path / "d")
    assert not write_data_dir(data, tmp_path / "d")
    assert snapshot(tmp_path / "d") == before

    changed = only(data, ["a-10", "a-9"])
    with pytest.raises(DataDirExistsError, match=r"wav.scp, text, utt2spk, spk2utt.*--overwrite"):
        write_data_dir(changed, tmp_path / "d")
    assert snapshot(tmp_path / "d") == before

    assert write_data_dir(changed, tmp_path / "d", overwrite=True)
    assert read_data_dir(tmp_path / "d") == changed


def test_overwrite_removes_a_stale_length_file(tmp_path):
    data = two_speakers(tmp_path)
    counted = DataDir(data.wav_scp, data.text, data.utt2spk, dict.fromkeys(data.utts, 3200))
    write_data_dir(counted, tmp_path / "d")
    with pytest.raises(DataDirExistsError, match="utt2num_samples"):
        write_data_dir(data, tmp_path / "d")
    write_data_dir(data, tmp_path / "d", overwrite=True)
    assert not (tmp_path / "d" / "utt2num_samples").exists()


def corrupt(tmp_path, name, content):
    write_data_dir(two_speakers(tmp_path), tmp_path / "d")
    (tmp_path / "d" / name).write_text(content)
    return tmp_path / "d"


def test_missing_file(tmp_path):
    write_data_dir(two_speakers(tmp_path), tmp_path / "d")
    os.remove(tmp_path / "d" / "utt2spk")
    with pytest.raises(UserError, match=r"missing file .*d/utt2spk"):
        read_data_dir(tmp_path / "d")


def test_duplicate_id_names_both_lines(tmp_path):
    d = corrupt(tmp_path, "utt2spk", "a-10 a\na-10 a\na-9 a\n")
    with pytest.raises(UserError, match=r"utt2spk:2: duplicate id 'a-10' \(first on line 1\)"):
        read_data_dir(d)


def test_unsorted_file_names_line(tmp_path):
    d = corrupt(tmp_path, "wav.scp", "a-9 x.wav\na-10 y.wav\n")
    with pytest.raises(UserError, match=r"wav.scp:2: 'a-10' comes after 'a-9'.*LC_ALL=C"):
        read_data_dir(d)


def test_transcript_without_audio(tmp_path):
    d = tmp_path / "d"
    data = two_speakers(tmp_path)
    write_data_dir(data, d)
    lines = (d / "text").read_text().splitlines()
    (d / "text").write_text("\n".join(lines[:2] + ["a-99 ORPHAN"] + lines[2:]) + "\n")
    with pytest.raises(
        UserError, match=r"text: utterance 'a-99' is a transcript line with no audio"
    ):
        read_data_dir(d)


def test_empty_transcript(tmp_path):
    d = tmp_path / "d"
    write_data_dir(two_speakers(tmp_path), d)
    text = (d / "text").read_text().replace("a-9 WORDS OF A-9", "a-9")
    (d / "text").write_text(text)
    with pytest.raises(UserError, match=r"text:2: 'a-9' has an empty transcript"):
        read_data_dir(d)
    assert read_data_dir(d, allow_empty_text=True).text["a-9"] == ""


def test_spk2utt_must_match_utt2spk(tmp_path):
    d = corrupt(tmp_path, "spk2utt", "a a-10\nb b-Z b-a b-é\n")
    with pytest.raises(
        UserError, match=r"spk2utt does not match .*utt2spk for speaker 'a'.*a-9"
    ):
        read_data_dir(d)


def test_speaker_order_must_follow_utterance_order(tmp_path):
    data = two_speakers(tmp_path)
    data.utt2spk = {**data.utt2spk, "a-9": "c"}  # a-9 sorts before b-* but its speaker after
    with pytest.raises(UserError, match=r"'b-Z' \(speaker 'b'\) sorts after 'a-9'"):
        write_data_dir(data, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_combine_keeps_every_utterance_once(tmp_path):
    data = two_speakers(tmp_path)
    a, b = only(data, ["a-10", "a-9"]), only(data, ["b-Z", "b-a", "b-é"])
    assert combine([b, a], "dev") == data
    with pytest.raises(UserError, match=r"dev: utterance 'a-10' is in two of the combined"):
        combine([a, data], "dev")
