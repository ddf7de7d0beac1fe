"""Asterisk prompt corpus: transcript parsing, normalisation, filtering, split and packaging."""

import gzip
import os
import shutil
import subprocess

import pytest
import soundfile

from dataprep_helpers import REPO, run_recipe_script, snapshot, write_tone
from espnet_plugin.recipe.asterisk import (
    PACKAGES,
    SOUNDS,
    TRANSCRIPTS,
    fetch_debs,
    normalize_transcript,
    parse_prompts,
    prepare,
    split_of,
)
from espnet_plugin.cli import UserError
from espnet_plugin.recipe.kaldi_data import DataDirExistsError, read_data_dir

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")

# Prompts in the format of core-sounds-en.txt: name, colon, free text; subdir names; comments.
WORDS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
    "hundred thousand million"
).split()
PLAIN = {f"greeting-{i:02d}": f"Hello, caller number {word}." for i, word in enumerate(WORDS)}
PLAIN.update(
    {
        "digits/1": "one",
        "call-fwd-no-ans": "Call-Forward on No Answer.",
        "vm-sorry": "I'm sorry I did not understand your response.",
        "conf-has-left": "...has left the conference.",
    }
)
NOT_WORDS = {
    "beep": "[this is a simple beep tone]",
    "silence/5": "(5 seconds of silence)",
    "vm-next": "Press 6 to play the next message.",
    "letters/plus": "plus [+]",
    "confbridge-join": "<beep ascending>",
    "spy-h323": "H.323",
}
NO_AUDIO = {"pls-try-call-later": "Please try your call again later."}


def write_transcripts(path, prompts, header="; Core Asterisk Sounds in English\n\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write(header + "".join(f"{name}: {text}\n" for name, text in prompts.items()))


@pytest.fixture
def debs(tmp_path):
    """The two packages, built with dpkg-deb from a small tree of real 8 kHz recordings."""
    seconds = {}
    for i, name in enumerate(sorted({**PLAIN, **NOT_WORDS})):
        seconds[name] = 0.25 + 0.01 * i
        write_tone(tmp_path / "pkg-wav" / SOUNDS / f"{name}.wav", seconds[name], rate=8000)
    write_transcripts(tmp_path / "pkg-txt" / TRANSCRIPTS, {**PLAIN, **NOT_WORDS, **NO_AUDIO})
    out = tmp_path / "debs"
    out.mkdir()
    for package, tree in zip(PACKAGES, ("pkg-wav", "pkg-txt")):
        control = tmp_path / tree / "DEBIAN" / "control"
        control.parent.mkdir()
        control.write_text(
            f"Package: {package}\nVersion: 1.0-1\nArchitecture: all\n"
            "Maintainer: Test <test@example.org>\nDescription: test package\n"
        )
        subprocess.run(
            [
                "dpkg-deb",
                "--root-owner-group",
                "-b",
                tmp_path / tree,
                out / f"{package}_1.0-1_all.deb",
            ],
            check=True,
            capture_output=True,
        )
    return out, seconds


def test_normalisation_is_librispeech_style():
    assert normalize_transcript("Please enter your number, followed by pound.") == (
        "PLEASE ENTER YOUR NUMBER FOLLOWED BY POUND"
    )
    assert normalize_transcript("Call-Forward on No Answer.") == "CALL FORWARD ON NO ANSWER"
    assert normalize_transcript("I'm sorry, that's not valid!") == "I'M SORRY THAT'S NOT VALID"
    assert normalize_transcript("...to leave the conference...") == "TO LEAVE THE CONFERENCE"
    assert normalize_transcript('He said "goodbye".') == "HE SAID GOODBYE"
    assert normalize_transcript("'quoted' words") == "QUOTED WORDS"


@pytest.mark.parametrize(
    "transcript",
    [
        "[ascending tones]",
        "(10 seconds of silence)",
        "<beep decending>",
        "press 5 to exit",
        "press * to cancel",
        "press # to exit",
        "H.323",
        "www.asterisk.org",
        "3D audio enabled",
        "dollar [$]",
        "Café",
        "",
        "...",
    ],
)
def test_prompts_that_are_not_plain_words_are_dropped(transcript):
    assert normalize_transcript(transcript) is None


def test_parse_prompt_list_format(tmp_path):
    path = tmp_path / "core-sounds-en.txt.gz"
    write_transcripts(
        path,
        {
            "digits/1": "one",
            "vm-leavemsg": " Press 5 to leave a message",
            "priv-callpending": "who introduces themselves as:",
        },
    )
    assert parse_prompts(path) == {
        "digits/1": "one",
        "vm-leavemsg": "Press 5 to leave a message",
        "priv-callpending": "who introduces themselves as:",
    }


def test_parse_errors_name_file_and_line(tmp_path):
    path = tmp_path / "core-sounds-en.txt.gz"
    write_transcripts(path, {"beep": "x"}, header="; comment\nno colon on this line\n")
    with pytest.raises(
        UserError, match=r"core-sounds-en.txt.gz:2: expected 'name: transcript'"
    ):
        parse_prompts(path)
    write_transcripts(path, {"beep": "x"}, header="beep: y\n")
    with pytest.raises(
        UserError, match=r"txt.gz:2: prompt 'beep' is listed twice \(first on line 1\)"
    ):
        parse_prompts(path)


REAL_TREE = REPO / "egs2/asterisk_en/asr1/downloads/extracted"


@pytest.mark.skipif(not (REAL_TREE / TRANSCRIPTS).is_file(), reason="asterisk recipe not run here")
def test_real_prompt_list_matches_the_recordings():
    prompts = parse_prompts(REAL_TREE / TRANSCRIPTS)
    recordings = {
        str(p.relative_to(REAL_TREE / SOUNDS).with_suffix(""))
        for p in (REAL_TREE / SOUNDS).rglob("*.wav")
    }
    assert len(recordings & prompts.keys()) >= 0.95 * len(recordings)
    assert prompts["digits/1"] == "one"


def test_split_is_stable_and_about_80_10_10():
    names = [f"prompt-{i}" for i in range(3000)]
    splits = [split_of(name) for name in names]
    for split, share in (("train", 0.8), ("dev", 0.1), ("test", 0.1)):
        assert splits.count(split) / len(names) == pytest.approx(share, abs=0.03)
    # A prompt's split depends on its name only, not on the other prompts.
    assert [split_of(name) for name in names[::7]] == splits[::7]


@needs_dpkg
def test_prepare_from_debs(tmp_path, debs, capsys):
    deb_dir, seconds = debs
    summary = prepare(tmp_path / "data", tmp_path / "downloads", deb_dir=deb_dir)
    splits = {split: read_data_dir(tmp_path / "data" / split) for split in ("train", "dev", "test")}
    utts = [utt for data in splits.values() for utt in data.utts]
    assert sorted(utts) == sorted(f"allison-{name.replace('/', '-')}" for name in PLAIN)
    assert all(len(data.utts) > 0 for data in splits.values())
    for split, data in splits.items():
        assert {data.utt2spk[u] for u in data.utts} == {"allison"}
        expected = sum(seconds[n] for n in PLAIN if f"allison-{n.replace('/', '-')}" in data.text)
        assert summary[split] == (len(data.utts), pytest.approx(expected, abs=1e-3))
        for path in data.wav_scp.values():
            assert soundfile.info(path).samplerate == 8000
    every = {**splits["train"].text, **splits["dev"].text, **splits["test"].text}
    assert every["allison-digits-1"] == "ONE"
    assert every["allison-call-fwd-no-ans"] == "CALL FORWARD ON NO ANSWER"
    assert every["allison-conf-has-left"] == "HAS LEFT THE CONFERENCE"
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    for split, (count, secs) in summary.items():
        assert rows[split] == [str(count), f"{secs:.1f}"]

    # Re-run: reuses the extracted tree, leaves everything as it was.
    before = snapshot(tmp_path)
    prepare(tmp_path / "data", tmp_path / "downloads", deb_dir=deb_dir)
    assert snapshot(tmp_path) == before


@needs_dpkg
def test_changed_corpus_does_not_clobber_data(tmp_path, debs):
    deb_dir, _ = debs
    prepare(tmp_path / "data", tmp_path / "downloads", deb_dir=deb_dir)
    before = snapshot(tmp_path / "data")
    tree = tmp_path / "downloads/extracted"
    write_transcripts(tree / TRANSCRIPTS, {**PLAIN, "digits/1": "uno"})
    with pytest.raises(DataDirExistsError, match="--overwrite"):
        prepare(tmp_path / "data", tmp_path / "downloads", deb_dir=deb_dir)
    assert snapshot(tmp_path / "data") == before


@needs_dpkg
def test_unreadable_recording_names_the_file(tmp_path, debs):
    deb_dir, _ = debs
    prepare(tmp_path / "data", tmp_path / "downloads", deb_dir=deb_dir)
    (tmp_path / "downloads/extracted" / SOUNDS / "digits/1.wav").write_bytes(b"RIFF garbage")
    with pytest.raises(
        UserError, match=r"prompt 'digits/1': cannot read audio file .*digits/1.wav"
    ):
        prepare(tmp_path / "data2", tmp_path / "downloads", deb_dir=deb_dir)


def test_deb_dir_without_packages(tmp_path):
    with pytest.raises(
        UserError, match=r"--deb_dir .* must hold asterisk-core-sounds-en-wav_\*.deb"
    ):
        prepare(tmp_path / "data", tmp_path / "downloads", deb_dir=tmp_path)


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_apt_failure_tells_how_to_fix_it(tmp_path, monkeypatch):
    # apt configured with empty package lists: what a machine that never ran apt-get update sees.
    (tmp_path / "lists/partial").mkdir(parents=True)
    (tmp_path / "apt.conf").write_text(
        f'Dir::State::Lists "{tmp_path}/lists";\nDir::Cache::pkgcache "";\n'
        'Dir::Cache::srcpkgcache "";\n'
    )
    monkeypatch.setenv("APT_CONFIG", str(tmp_path / "apt.conf"))
    with pytest.raises(
        UserError, match=r"(?s)apt-get download .*failed.*apt-get update.*--deb_dir"
    ):
        fetch_debs(tmp_path / "downloads")


@needs_dpkg
def test_recipe_data_sh(tmp_path, debs):
    script = "asterisk_en/asr1/local/data.sh"
    assert os.access(REPO / "egs2" / script, os.X_OK)
    result = run_recipe_script(script, ["--deb_dir", debs[0]], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "downloads/extracted" / TRANSCRIPTS).is_file()
    counts = [
        len(read_data_dir(tmp_path / "data" / split).utts) for split in ("train", "dev", "test")
    ]
    assert sum(counts) == len(PLAIN)
