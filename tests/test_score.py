"""recipe.score against hand-worked counts and against NIST sclite, the scorer ESPnet runs."""

import json
import random
import re
import shutil
import subprocess

import pytest
from espnet2.text.char_tokenizer import CharTokenizer

from espnet_plugin.cli import UserError
from espnet_plugin.recipe.kaldi_data import read_text
from espnet_plugin.recipe.score import (
    UtteranceCounts,
    main,
    read_summary,
    read_utterance_counts,
    score,
)

# Hand-made, LibriSpeech-like transcripts (lower case: sclite ignores case by default).
SENTENCES = [
    "the old man walked slowly down the narrow road toward the village",
    "she opened the window and looked out at the quiet garden",
    "there was nothing left to do but wait for the morning",
    "he had never seen so many stars in the winter sky",
    "the children ran across the field laughing and shouting",
    "it is a strange thing how quickly one forgets a face",
    "we must leave before the river rises any higher",
    "the captain gave his orders in a low steady voice",
    "a small boat lay on its side among the reeds",
    "i cannot tell you how glad i am to see you again",
    "the letter arrived three days after he had gone",
    "they sat by the fire and talked until late in the night",
    "her father was a doctor in a little town by the sea",
    "the wind had dropped and the rain had almost stopped",
    "nobody in the house had heard the door open",
    "you will find the key under the stone by the gate",
    "the horses were tired after the long climb up the hill",
    "he put down his pen and read the page once more",
    "the bells of the church were ringing for the evening service",
    "she laughed at the idea but said nothing more about it",
    "the road turned sharply to the left beyond the bridge",
    "there were two men waiting for him at the station",
    "the lamp on the table gave only a faint yellow light",
    "my brother and i used to fish in that stream",
    "the soldiers marched on through the dust and the heat",
    "at last the ship came in sight of the harbour",
    "he knew that he had made a terrible mistake",
    "the garden was full of roses and tall white lilies",
    "every morning she walked to the market with her basket",
    "the house stood alone at the end of a long avenue of trees",
    "they could hear the sound of music from the hall below",
    "the king sent for his wisest counsellors at once",
    "it was the coldest winter anyone could remember",
    "the snow lay deep on the mountain paths",
    "he turned the corner and found himself in a crowded square",
    "the old woman smiled and handed him a cup of tea",
]
# Words that occur in no sentence, so an edit can never be matched by chance.
FOREIGN_WORDS = ["zephyr", "quokka", "vex", "jumbo", "kiwi", "fjord", "pzazz", "oxbow", "lynx"]


def sclite_command() -> list[str] | None:
    """sclite on PATH, or Debian's ``sctk`` wrapper (apt-get install sctk) that runs it."""
    if shutil.which("sclite"):
        return ["sclite"]
    if shutil.which("sctk"):
        return ["sctk", "sclite"]
    return None


needs_sclite = pytest.mark.skipif(sclite_command() is None, reason="sclite (SCTK) not installed")


def sclite_counts(tmp_path, ref: dict[str, list[str]], hyp: dict[str, list[str]]) -> dict:
    """sclite's per-utterance (C, S, D, I), run the way ESPnet's asr.sh runs it (trn, -i rm)."""
    for name, texts in (("ref.trn", ref), ("hyp.trn", hyp)):
        lines = [f"{' '.join(tokens)} (spk-{utt_id})\n" for utt_id, tokens in texts.items()]
        (tmp_path / name).write_text("".join(lines), encoding="utf-8")
    run = subprocess.run(
        [*sclite_command(), "-e", "utf-8", "-c", "NOASCII", "-r", str(tmp_path / "ref.trn"),
         "trn", "-h", str(tmp_path / "hyp.trn"), "trn", "-i", "rm", "-o", "pralign", "stdout"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    pattern = r"id: \(spk-(\S+)\)\nScores: \(#C #S #D #I\) (\d+) (\d+) (\d+) (\d+)"
    found = re.findall(pattern, run.stdout)
    counts = {utt_id: tuple(map(int, c)) for utt_id, *c in found}
    assert counts.keys() == ref.keys(), run.stdout[-2000:]
    return counts


def corrupted(words: list[str], rng: random.Random) -> list[str]:
    """Up to three isolated substitutions/deletions/insertions, at least two correct words apart."""
    out = list(words)
    positions = sorted(rng.sample(range(0, len(words), 3), k=rng.randint(1, 3)), reverse=True)
    for pos in positions:  # right to left, so earlier positions stay valid
        edit = rng.choice(["sub", "del", "ins"])
        if edit == "sub":
            out[pos] = rng.choice(FOREIGN_WORDS)
        elif edit == "del":
            del out[pos]
        else:
            out.insert(pos, rng.choice(FOREIGN_WORDS))
    return out


def realistic_decode() -> tuple[dict[str, str], dict[str, str]]:
    """Three dozen utterances: most with scattered errors, some perfect, some empty hypotheses."""
    rng = random.Random(20240611)
    ref, hyp = {}, {}
    for i, sentence in enumerate(SENTENCES):
        utt_id = f"utt{i:03d}"
        ref[utt_id] = sentence
        words = sentence.split()
        if i % 9 == 4:
            hyp[utt_id] = ""  # decoder produced nothing
        elif i % 7 == 3:
            hyp[utt_id] = sentence
        else:
            hyp[utt_id] = " ".join(corrupted(words, rng))
    return ref, hyp


def our_counts(result) -> dict:
    return {
        utt.utt_id: (utt.count("C"), utt.count("S"), utt.count("D"), utt.count("I"))
        for utt in result.utterances
    }


@needs_sclite
def test_word_counts_match_sclite(tmp_path):
    ref, hyp = realistic_decode()
    expected = sclite_counts(
        tmp_path, {k: v.split() for k, v in ref.items()}, {k: v.split() for k, v in hyp.items()}
    )
    result = score(ref, hyp, "word")
    assert our_counts(result) == expected
    summary = result.summary("test")
    c, s, d, i = (sum(col) for col in zip(*expected.values()))
    assert (summary["hits"], summary["substitutions"], summary["deletions"]) == (c, s, d)
    assert summary["insertions"] == i
    assert summary["ref_len"] == c + s + d == sum(len(v.split()) for v in ref.values())
    assert summary["error_rate"] == pytest.approx(100 * (s + d + i) / (c + s + d))
    assert summary["sentence_errors"] == sum(sdi != [0, 0, 0] for _, *sdi in expected.values())
    assert 0 < summary["sentence_errors"] < summary["num_utts"] == len(SENTENCES)
    assert s > 0 and d > 0 and i > 0


@needs_sclite
def test_char_counts_match_sclite_on_espnet_char_tokens(tmp_path):
    # ESPnet's CER: its CharTokenizer turns each space into a "<space>" token before sclite.
    tokenizer = CharTokenizer(space_symbol="<space>")
    ref, hyp = realistic_decode()
    expected = sclite_counts(
        tmp_path,
        {k: tokenizer.text2tokens(v) for k, v in ref.items()},
        {k: tokenizer.text2tokens(v) for k, v in hyp.items()},
    )
    assert our_counts(score(ref, hyp, "char")) == expected


@needs_sclite
def test_error_count_never_exceeds_sclites_on_adversarial_text(tmp_path):
    # Tiny vocabulary, so many equally short alignments exist (shifted words, repeats). sclite's
    # 4/3/3 weights may pick one with more errors; a minimum edit distance never can, and it
    # cannot beat the length difference either.
    rng = random.Random(7)
    ref, hyp = {}, {}
    for n in range(300):
        ref[f"u{n:03d}"] = " ".join(rng.choices("abcd", k=rng.randint(1, 8)))
        hyp[f"u{n:03d}"] = " ".join(rng.choices("abcd", k=rng.randint(0, 8)))
    theirs = sclite_counts(
        tmp_path, {k: v.split() for k, v in ref.items()}, {k: v.split() for k, v in hyp.items()}
    )
    for utt in score(ref, hyp, "word").utterances:
        c, s, d, i = theirs[utt.utt_id]
        assert utt.ref_len == c + s + d
        assert abs(len(ref[utt.utt_id].split()) - len(hyp[utt.utt_id].split())) <= utt.errors
        assert utt.errors <= s + d + i


def test_hand_worked_words():
    ref = {
        "a": "the cat sat on the mat",
        "b": "hello world",
        "c": "good morning",
        "d": "yes",
    }
    hyp = {
        "a": "the cat sit on mat",  # sat->sit (S), second "the" dropped (D): C4 S1 D1 I0
        "b": "hello big world",  # "big" inserted: C2 I1
        "c": "",  # empty hypothesis: D2
        "d": "yes",  # perfect: C1
    }
    # Totals: 11 reference words, C=7 S=1 D=3 I=1 -> 5 errors, WER 5/11; 3 of 4 sentences wrong.
    result = score(ref, hyp, "word")
    summary = result.summary("hand")
    counts = [summary[k] for k in ("hits", "substitutions", "deletions", "insertions")]
    assert counts == [7, 1, 3, 1]
    assert summary["ref_len"] == 11 and summary["errors"] == 5
    assert summary["error_rate"] == pytest.approx(100 * 5 / 11)
    assert summary["sentence_errors"] == 3 and summary["sentence_error_rate"] == 75.0
    first = result.utterances[0]
    assert first.ref == ("the", "cat", "sat", "on", "the", "mat")
    assert first.hyp == ("the", "cat", "sit", "on", None, "mat")
    assert first.ops == ("C", "C", "S", "C", "D", "C")


def test_hand_worked_chars_count_the_space():
    # "ab cd" is a b <space> c d: 5 tokens. "abcd" lost the space: D1.
    # "ab  ce" (two spaces) is single-spaced first, then d->e: S1. CER = 2/10.
    result = score({"x": "ab cd", "y": "ab cd"}, {"x": "abcd", "y": "ab  ce"}, "char")
    summary = result.summary("chars")
    assert (summary["ref_len"], summary["deletions"], summary["substitutions"]) == (10, 1, 1)
    assert summary["insertions"] == 0 and summary["error_rate"] == pytest.approx(20.0)
    assert result.utterances[0].ref == ("a", "b", "<space>", "c", "d")
    assert result.utterances[0].hyp == ("a", "b", None, "c", "d")


def write_text(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_cli_writes_json_table_and_alignments(tmp_path):
    ref = write_text(tmp_path / "ref", ["u1 the cat sat on the mat", "u2 good morning"])
    hyp = write_text(tmp_path / "hyp", ["u1 the cat sit on mat", "u2"])  # S1 D1, then D2
    main(["--ref", ref, "--hyp", hyp, "--out_dir", str(tmp_path / "score_word"), "--name", "dev"])
    result = json.loads((tmp_path / "score_word" / "result.json").read_text())
    assert (result["name"], result["unit"]) == ("dev", "word")
    assert (result["ref_len"], result["errors"]) == (8, 4)
    assert result["error_rate"] == 50.0 and result["sentence_error_rate"] == 100.0
    # Last line is the summary row: dataset Snt Wrd Corr Sub Del Ins Err S.Err.
    row = (tmp_path / "score_word" / "result.txt").read_text().splitlines()[-1]
    assert row == "|dev|2|8|50.0|12.5|37.5|0.0|50.0|100.0|"
    blocks = (tmp_path / "score_word" / "alignments.txt").read_text().split("\n\n")
    assert blocks[0].splitlines() == [
        "id: (u1)",
        "Scores: (#C #S #D #I) 4 1 1 0",
        "REF:  the cat sat on the mat",
        "HYP:  the cat sit on *** mat",
        "Eval:         S      D",
    ]
    assert blocks[1].splitlines()[1:] == [
        "Scores: (#C #S #D #I) 0 0 2 0",
        "REF:  good morning",
        "HYP:  ***  ***",
        "Eval: D    D",
    ]


def test_cli_writes_each_utterances_counts_for_the_bootstrap(tmp_path):
    ref = write_text(tmp_path / "ref", ["u1 the cat sat on the mat", "u2 good morning"])
    hyp = write_text(tmp_path / "hyp", ["u1 the cat sit on mat", "u2"])
    main(["--ref", ref, "--hyp", hyp, "--out_dir", str(tmp_path / "score_word")])
    counts = read_utterance_counts(tmp_path / "score_word" / "utterances.json")
    assert counts == {"u1": UtteranceCounts(2, 6), "u2": UtteranceCounts(2, 2)}
    assert json.loads((tmp_path / "score_word" / "utterances.json").read_text())["u1"] == {
        "errors": 2, "ref_len": 6}
    assert read_summary(tmp_path / "score_word" / "result.json")["errors"] == 4


@pytest.mark.parametrize("content, problem", [
    ("{", "not valid JSON"),
    ("[]", "expected a non-empty JSON object"),
    ('{"u1": {"errors": -1, "ref_len": 3}}', "utterance 'u1' needs whole numbers"),
    ('{"u1": {"errors": 1}}', "utterance 'u1' needs whole numbers"),
])  # fmt: skip
def test_malformed_utterance_counts_are_named(tmp_path, content, problem):
    (tmp_path / "utterances.json").write_text(content)
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'utterances.json'}: {problem}")):
        read_utterance_counts(tmp_path / "utterances.json")


@pytest.mark.parametrize("content, problem", [
    ("not json", "not valid JSON"),
    ('["word"]', "expected a JSON object"),
    ('{"unit": "word"}', "lacks name, metric, error_rate"),
])  # fmt: skip
def test_malformed_summary_is_named(tmp_path, content, problem):
    (tmp_path / "result.json").write_text(content)
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'result.json'}: {problem}")):
        read_summary(tmp_path / "result.json")


def run_cli_error(tmp_path, ref_lines, hyp_lines, *extra) -> str:
    ref = write_text(tmp_path / "ref", ref_lines)
    hyp = write_text(tmp_path / "hyp", hyp_lines)
    with pytest.raises(UserError) as error:
        main(["--ref", ref, "--hyp", hyp, "--out_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()
    return str(error.value)


def test_hypothesis_missing_utterances_are_named(tmp_path):
    message = run_cli_error(tmp_path, ["u1 a", "u2 b", "u3 c"], ["u2 b"])
    assert "lacks 2 of the 3 utterances" in message and "u1, u3" in message
    assert str(tmp_path / "hyp") in message and str(tmp_path / "ref") in message


def test_hypothesis_with_unknown_utterance_is_named(tmp_path):
    message = run_cli_error(tmp_path, ["u1 a"], ["u1 a", "u9 z"])
    assert "1 utterances that" in message and "u9" in message


def test_empty_reference_file(tmp_path):
    message = run_cli_error(tmp_path, [], [])
    assert str(tmp_path / "ref") in message and "no utterances" in message


def test_all_empty_references_leave_the_rate_undefined(tmp_path):
    message = run_cli_error(tmp_path, ["u1", "u2"], ["u1 a", "u2"], "--unit", "char")
    assert "CER is undefined" in message


def test_reading_text_files(tmp_path):
    # An id alone is an empty transcript; only "\n" ends a line (U+2028 stays in the text).
    write_text(tmp_path / "ok", ["u1 a\u2028b", "u2", "u3  two   spaces "])
    assert read_text(tmp_path / "ok") == {"u1": "a\u2028b", "u2": "", "u3": "two   spaces"}
    write_text(tmp_path / "empty", [])
    assert read_text(tmp_path / "empty") == {}


def test_malformed_text_files(tmp_path):
    write_text(tmp_path / "dup", ["u1 a", "u1 b"])
    with pytest.raises(ValueError, match=r"dup:2: duplicate id 'u1' \(first on line 1\)"):
        read_text(tmp_path / "dup")
    write_text(tmp_path / "blank", ["u1 a", "", "u2 b"])
    with pytest.raises(ValueError, match=r"blank:2: empty line"):
        read_text(tmp_path / "blank")
    with pytest.raises(ValueError, match="unit must be one of word, char, got 'phone'"):
        score({"u": "a"}, {"u": "a"}, "phone")
