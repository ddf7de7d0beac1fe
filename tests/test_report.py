"""recipe.report over an exp tree the real scorer built: table values, sidecars, plots, errors."""

import json

import pytest
from matplotlib.image import imread

from espnet_plugin.cli import UserError
from espnet_plugin.recipe import score
from espnet_plugin.recipe.report import main

REF = ["u1 the cat sat on the mat", "u2 good morning to you", "u3 yes"]
# One hypothesis file per (model, test set); each has a different number of errors.
HYPS = {
    "clean_a": ["u1 the cat sit on the mat", "u2 good morning to you", "u3 yes"],
    "other_a": ["u1 the cat sat on mat", "u2 good morning", "u3 yes no"],
    "clean_b": ["u1 a cat sat on the hat", "u2", "u3 yes"],
}
CONFORMER = "asr_conformer/decode_asr_model_valid.acc.ave"
CONMAMBA = "ablation/asr_conmamba/decode_beam5"  # the model is two folders deep


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def decode_and_score(exp, decode: str, test_set: str, hyp: str, units=("word", "char")):
    """What asr.sh stages 8-9 leave behind: <decode>/<test_set>/text and score_<unit>/."""
    write_lines(exp.parent / "ref" / "text", REF)
    write_lines(exp / decode / test_set / "text", HYPS[hyp])
    for unit in units:
        score.main([
            "--ref", str(exp.parent / "ref" / "text"),
            "--hyp", str(exp / decode / test_set / "text"),
            "--out_dir", str(exp / decode / test_set / f"score_{unit}"),
            "--unit", unit,
        ])  # fmt: skip


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def exp(tmp_path):
    exp = tmp_path / "exp"
    decode_and_score(exp, CONFORMER, "test_clean", "clean_a")
    decode_and_score(exp, CONFORMER, "test_other", "other_a")
    decode_and_score(exp, CONMAMBA, "test_clean", "clean_b", units=("word",))
    return exp


def read_markdown_table(path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = lines[0].strip("|").split("|")
    return [dict(zip(header, line.strip("|").split("|"))) for line in lines[2:]]


def result_json(exp, decode, test_set, unit) -> dict:
    return json.loads((exp / decode / test_set / f"score_{unit}" / "result.json").read_text())


def assert_png(path):
    image = imread(path)  # raises on anything that is not a PNG
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn


def test_table_and_json_carry_the_scores(exp, tmp_path, capsys):
    out = tmp_path / "report"
    main(["--exp_dir", str(exp), "--out_dir", str(out)])
    rows = read_markdown_table(out / "RESULTS.md")
    merged = json.loads((out / "results.json").read_text())["rows"]
    systems = [
        (CONMAMBA, "test_clean", ("word",)),
        (CONFORMER, "test_clean", ("word", "char")),
        (CONFORMER, "test_other", ("word", "char")),
    ]
    assert [(r["model"], r["decode"], r["test_set"]) for r in rows] == [
        (*decode.rsplit("/", 1), test_set) for decode, test_set, _ in systems
    ]
    for row, record, (decode, test_set, units) in zip(rows, merged, systems):
        word = result_json(exp, decode, test_set, "word")
        assert record["WER"] == word["error_rate"] and row["WER"] == f"{word['error_rate']:.2f}"
        for column, key in (("Sub", "sub_rate"), ("Del", "del_rate"), ("Ins", "ins_rate")):
            assert record[column] == word[key] and row[column] == f"{word[key]:.2f}"
        if "char" in units:
            char = result_json(exp, decode, test_set, "char")
            assert record["CER"] == char["error_rate"] and row["CER"] == f"{char['error_rate']:.2f}"
            assert record["scores"]["char"] == char
        else:
            assert record["CER"] is None and row["CER"] == "-"
        assert record["scores"]["word"] == word
    # The three decodes differ, so a mixed-up row would show: clean_b has 6 of 11 words wrong.
    assert merged[0]["WER"] == pytest.approx(100 * 6 / 11)
    # Without sidecars there is nothing to plot but the error rates.
    assert sorted(p.name for p in out.glob("*.png")) == ["cer.png", "wer.png"]
    for png in out.glob("*.png"):
        assert_png(png)
    assert str(out / "RESULTS.md") in capsys.readouterr().out


def test_sidecars_add_columns_and_plots(exp, tmp_path):
    conformer = exp / CONFORMER
    write_json(conformer / "decode_stats.json", {
        "rtf": 0.25, "peak_memory_bytes": 300 * 2**20, "kv_cache_bytes": 64 * 2**20,
        "per_layer": [1, 2],  # nested: not a column
    })  # fmt: skip
    # Nearer the test set wins: test_clean's own benchmark overrides the decode dir's rtf.
    write_json(conformer / "test_clean" / "benchmark_speed.json", {"rtf": 0.2, "device": "cpu"})
    conmamba_model = exp / "ablation" / "asr_conmamba"
    write_json(conmamba_model / "benchmark.json", {"kv_cache_bytes": 0, "rtf": 0.1})
    out = tmp_path / "report"
    main(["--exp_dir", str(exp), "--out_dir", str(out)])
    table = json.loads((out / "results.json").read_text())
    assert table["columns"][-4:] == ["rtf", "kv_cache_bytes", "peak_memory_bytes", "device"]
    by_key = {(r["model"], r["test_set"]): r for r in table["rows"]}
    expected = {
        ("ablation/asr_conmamba", "test_clean"): (0.1, 0, None, None),
        ("asr_conformer", "test_clean"): (0.2, 64 * 2**20, 300 * 2**20, "cpu"),
        ("asr_conformer", "test_other"): (0.25, 64 * 2**20, 300 * 2**20, None),
    }
    for key, values in expected.items():
        assert tuple(by_key[key][c] for c in table["columns"][-4:]) == values
    assert "per_layer" not in table["columns"]
    md_rows = read_markdown_table(out / "RESULTS.md")
    assert [r["kv_cache_bytes"] for r in md_rows] == ["0", str(64 * 2**20), str(64 * 2**20)]
    assert [r["device"] for r in md_rows] == ["-", "cpu", "-"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "cer.png", "kv_cache_bytes.png", "peak_memory_bytes.png", "wer.png", "wer_vs_rtf.png"
    ]
    for png in pngs:
        assert_png(out / png)
        assert f"({png})" in (out / "RESULTS.md").read_text()


def report_error(exp, tmp_path) -> str:
    with pytest.raises(UserError) as error:
        main(["--exp_dir", str(exp), "--out_dir", str(tmp_path / "report")])
    return str(error.value)


def test_nothing_to_report(tmp_path):
    (tmp_path / "exp" / "asr_x" / "decode" / "test").mkdir(parents=True)
    message = report_error(tmp_path / "exp", tmp_path)
    assert "no scores under" in message and "score_<unit>/result.json" in message
    assert "is not a folder" in report_error(tmp_path / "missing", tmp_path)


def test_layout_and_sidecar_errors_name_the_file(exp, tmp_path):
    write_json(exp / CONFORMER / "decode_stats.json", {"rtf": "fast"})
    assert "decode_stats.json: 'rtf' must be a number" in report_error(exp, tmp_path)
    write_json(exp / CONFORMER / "decode_stats.json", {"WER": 1.0})
    assert "key 'WER' would hide" in report_error(exp, tmp_path)
    (exp / CONFORMER / "decode_stats.json").unlink()
    # A second word score of the same decode (e.g. an old score_wer folder) is ambiguous.
    duplicate = exp / CONFORMER / "test_clean" / "score_wer"
    duplicate.mkdir()
    (duplicate / "result.json").write_bytes(
        (exp / CONFORMER / "test_clean" / "score_word" / "result.json").read_bytes()
    )
    assert "both score unit 'word'" in report_error(exp, tmp_path)
    (duplicate / "result.json").unlink()
    shallow = exp / "asr_x" / "score_word"
    shallow.mkdir(parents=True)
    write_json(shallow / "result.json", {"unit": "word"})
    assert "too shallow for the layout" in report_error(exp, tmp_path)
