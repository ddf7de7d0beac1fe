"""recipe.report over a hand-made study tree that the real scorer scored: rows, missing values,
grouping, the MHA sibling's cache ratio, the comparisons and their bootstrap, stale rows, figures
and the errors on bad input."""

import csv
import json
import re

import numpy as np
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.text import Text

from espnet_plugin.cli import UserError
from espnet_plugin.recipe import score
from espnet_plugin.recipe.report import main
from espnet_plugin.recipe.report_plots import ErrorBar, Point, Style, name_points, wer_over_seeds
from espnet_plugin.recipe.stamp import file_hash

DECODE = "decode_asr_asr_model_valid.acc.ave"
LM_DECODE = "decode_asr_lm_lm_tiny_valid.loss.ave_asr_model_valid.acc.ave"
TEST_SETS = {"test_clean": 30, "test_other": 20}  # utterances
WORDS = ["alpha", "bravo", "charlie", "delta"]
NO_LM = {"inference_args": "", "inference_config": "conf/decode_asr.yaml", "lm": "none"}
WITH_LM = {"inference_args": "--lm_weight 0.6", "inference_config": "conf/decode_asr.yaml",
           "lm": "exp/lm_tiny"}


def ref_lines(test_set):
    return [f"{test_set}_{i:02d} {' '.join(WORDS)}" for i in range(TEST_SETS[test_set])]


def hyp_lines(test_set, quality):
    """perfect: no error; poor: one substitution per utterance; mixed: one in every third."""
    lines = []
    for i in range(TEST_SETS[test_set]):
        wrong = quality == "poor" or (quality == "mixed" and i % 3 == 0)
        lines.append(f"{test_set}_{i:02d} {'zulu' if wrong else WORDS[0]} {' '.join(WORDS[1:])}")
    return lines


def conformer(attention, encoder="conformer_x", **encoder_conf):
    return {
        "encoder": encoder,
        "encoder_conf": {"output_size": 256, "num_blocks": 12, "attention_type": attention,
                         **encoder_conf},
        "decoder": "cached_transformer",
        "decoder_conf": {"num_blocks": 6, "self_attention_type": attention},
        "model_conf": {"ctc_weight": 0.3},
    }


def conmamba(**encoder_conf):
    return {
        "encoder": "conmamba",
        "encoder_conf": {"output_size": 144, "num_blocks": 12, **encoder_conf},
        "decoder": "transformer",
        "decoder_conf": {"num_blocks": 4},
    }


def profile(utterances, kb=None, ms=100.0, audio=60.0, peak_mb=500, chunking=None, analytic=None):
    """A decode_stats.json with the keys the profiler writes; kb None: a decoder without cache."""
    cache = None if kb is None else {
        "self_bytes_per_token": 1024, "self_fixed_bytes": 0, "cross_bytes_per_frame": 512,
        "beam_bytes_per_utterance": kb * 1024.0, "hypothesis_bytes_per_utterance": kb * 100.0,
        "mha_beam_bytes_per_utterance": kb * 1024.0 / (analytic or 1.0),
        "ratio_to_mha_analytic": analytic or 1.0, "measured_equals_analytic": True}
    return {
        "utterances": utterances, "audio_seconds": audio, "decode_ms_per_utterance": ms,
        "rtf": ms * utterances / 1000 / audio, "peak_memory_bytes": peak_mb * 2**20,
        "peak_memory_kind": "peak resident memory while decoding (model included)",
        "parameters": 30_000_000, "kv_cache": cache, "chunking": chunking,
        "settings": {"beam_size": 10}, "model": {}, "machine": {}, "per_utterance": [{}],
    }  # fmt: skip


class Study:
    """Writes what asr.sh writes, stamps included, into a recipe dir."""

    def __init__(self, recipe):
        self.recipe, self.exp = recipe, recipe / "exp"
        for test_set in TEST_SETS:
            write_lines(recipe / "dump/raw" / test_set / "text", ref_lines(test_set))
            write_lines(recipe / "dump/raw" / test_set / "wav.scp",
                        [f"{line.split()[0]} a.wav" for line in ref_lines(test_set)])
        write(recipe / "conf/decode_asr.yaml", "beam_size: 10\nlm_weight: 0.3\n")
        write(recipe / "exp/lm_tiny/config.yaml", "lm: transformer\n")

    def stamp(self, folder, files, options=None):
        files = {str(f): file_hash(self.recipe / f) for f in files}
        write(folder / ".stamp", json.dumps({"options": options or {}, "files": files,
                                             "configs": {}}))

    def model(self, name, config, options=None, conversion=None):
        folder = self.exp / name
        write(folder / "config.yaml", yaml.safe_dump(config))
        write(folder / "valid.acc.ave.pth", f"weights of {name}")
        self.stamp(folder, [f"exp/{name}/config.yaml"], options)
        if conversion is not None:
            write(folder / "conversion/report.json", json.dumps(conversion))
        return folder

    def decode(self, model, test_set, quality, decode=DECODE, decoding=NO_LM, stats=None):
        """Stages 8-10: hypotheses and their stamp, both scores, and the profile if given."""
        folder = self.exp / model / decode / test_set
        model_files = [f"exp/{model}/config.yaml", f"exp/{model}/valid.acc.ave.pth",
                       decoding["inference_config"], f"dump/raw/{test_set}/wav.scp"]
        write_lines(folder / "text", hyp_lines(test_set, quality))
        self.stamp(folder, model_files, decoding)
        for unit in ("word", "char"):
            score.main(["--ref", str(self.recipe / "dump/raw" / test_set / "text"),
                        "--hyp", str(folder / "text"), "--unit", unit,
                        "--out_dir", str(folder / f"score_{unit}")])  # fmt: skip
            self.stamp(folder / f"score_{unit}",
                       [f"dump/raw/{test_set}/text", f"exp/{model}/{decode}/{test_set}/text"])
        if stats is not None:
            write(folder / "profile/decode_stats.json", json.dumps(stats))
            self.stamp(folder / "profile", model_files, decoding)
        return folder


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_lines(path, lines):
    write(path, "".join(line + "\n" for line in lines))


BENCHMARK = {
    "machine": {"cpu": "test"}, "config": {"d_model": 144},
    "runs": [{"device": "cpu", "threads": threads, "encoders": [
        {"seconds": s, "pass": p, "conformer_ms": s * s * threads, "conmamba_ms": 3 * s,
         "conformer_ms_per_second": s * threads, "conmamba_ms_per_second": 3.0}
        for s in (5, 10, 20) for p in ("fwd", "fwd+bwd")]} for threads in (1, 2)],
}  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study's systems, each with what makes it a test case."""
    study = Study(tmp_path_factory.mktemp("recipe"))
    # MHA Conformer: two test sets profiled on different utterance counts, and an LM decode.
    study.model("asr_conformer_mha", conformer("mha"))
    study.decode("asr_conformer_mha", "test_clean", "poor",
                 stats=profile(30, kb=40, ms=100, audio=60))
    study.decode("asr_conformer_mha", "test_other", "poor",
                 stats=profile(10, kb=60, ms=200, audio=30, peak_mb=700))
    for test_set in TEST_SETS:
        study.decode("asr_conformer_mha", test_set, "mixed", decode=LM_DECODE, decoding=WITH_LM)
    # MLA Conformer: better on every utterance; its cache is measured against the MHA one's.
    study.model("asr_conformer_mla", conformer("mla", attention_conf={"kv_latent_dim": 96}))
    study.decode("asr_conformer_mla", "test_clean", "perfect",
                 stats=profile(30, kb=10, analytic=0.25))
    study.decode("asr_conformer_mla", "test_other", "perfect",
                 stats=profile(10, kb=16, analytic=0.3))
    # The MHA model converted to MLA and fine-tuned: the same hypotheses as the scratch MLA one,
    # profiled on test_clean only; and its control, the MHA model fine-tuned without conversion.
    study.model("asr_conformer_mha_to_mla", conformer("mla"),
                {"finetune_from": "exp/asr_conformer_mha", "convert_args": "--target mla"},
                conversion={"target": "mla", "source": {
                    "config": "exp/asr_conformer_mha/config.yaml", "model": "x.pth"}})
    study.decode("asr_conformer_mha_to_mla", "test_clean", "perfect",
                 stats=profile(30, kb=10, analytic=0.25))
    study.decode("asr_conformer_mha_to_mla", "test_other", "perfect")
    study.model("asr_conformer_mha_ft", conformer("mha"),
                {"finetune_from": "exp/asr_conformer_mha", "convert_args": ""})
    for test_set in TEST_SETS:
        study.decode("asr_conformer_mha_ft", test_set, "mixed")
    # GQA Conformer: its hypotheses change after scoring (stale).
    study.model("asr_conformer_gqa", conformer("gqa"))
    stale = study.decode("asr_conformer_gqa", "test_clean", "mixed")
    # Branchformer MLA: no profile, no MHA sibling, one test set.
    study.model("asr_branchformer_mla", conformer("mla", encoder="branchformer_x"))
    study.decode("asr_branchformer_mla", "test_clean", "mixed")
    # ConMamba: stock decoder (no cache); with dynamic chunking, two folders deep.
    study.model("asr_conmamba", conmamba())
    for test_set in TEST_SETS:
        study.decode("asr_conmamba", test_set, "mixed", stats=profile(20, ms=50))
    dc = conmamba(dynamic_chunking={"after_block": 8, "target_ratio": 0.5})
    study.model("ablation/asr_conmamba_dc", dc)
    study.decode("ablation/asr_conmamba_dc", "test_clean", "poor", stats=profile(
        30, ms=40, chunking={"kept_frames": 400, "frames": 1000, "ratio": 0.4}))
    study.decode("ablation/asr_conmamba_dc", "test_other", "poor", stats=profile(
        20, ms=40, chunking={"kept_frames": 100, "frames": 500, "ratio": 0.2}))
    write(study.exp / "benchmarks/benchmark_encoder.json", json.dumps(BENCHMARK))
    write_lines(stale / "text", hyp_lines("test_clean", "perfect"))
    return study


@pytest.fixture(scope="module")
def report(study):
    out = study.recipe / "report"
    main(["--exp_dir", str(study.exp), "--out_dir", str(out), "--bootstrap_samples", "1000"])
    return out


def results(report) -> dict:
    return json.loads((report / "results.json").read_text())


def table_rows(report) -> list[dict]:
    return [system["row"] for system in results(report)["systems"]]


def rows_by_system(report) -> dict[str, dict]:
    return {f"{r['model']}/{r['decode']}": r for r in table_rows(report)}


def markdown_rows(path) -> list[dict[str, str]]:
    """The first table of RESULTS.md as dicts."""
    text = path.read_text().split("\n\n")
    table = next(block for block in text if block.startswith("| model"))
    lines = [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()]
    return [dict(zip(lines[0], line)) for line in lines[2:]]


def test_rows_are_grouped_by_encoder_then_attention_then_model(report):
    systems = [f"{r['model']}/{r['decode']}" for r in table_rows(report)]
    assert systems == [
        f"asr_conformer_mha/{DECODE}", f"asr_conformer_mha/{LM_DECODE}",
        f"asr_conformer_mha_ft/{DECODE}",
        f"asr_conformer_mha_to_mla/{DECODE}", f"asr_conformer_mla/{DECODE}",
        f"asr_conformer_gqa/{DECODE}",
        f"asr_branchformer_mla/{DECODE}",
        f"ablation/asr_conmamba_dc/{DECODE}", f"asr_conmamba/{DECODE}",
    ]  # fmt: skip
    md = markdown_rows(report / "RESULTS.md")
    assert [(r["model"], r["decode"]) for r in md] == [tuple(s.rsplit("/", 1)) for s in systems]
    txt = (report / "RESULTS.txt").read_text().splitlines()
    header = next(i for i, line in enumerate(txt) if line.startswith("model "))
    assert [line.split()[:2] for line in txt[header + 2:header + 2 + len(systems)]] == [
        s.rsplit("/", 1) for s in systems]


def test_columns_say_what_each_model_is(report):
    rows = rows_by_system(report)
    mha, lm = rows[f"asr_conformer_mha/{DECODE}"], rows[f"asr_conformer_mha/{LM_DECODE}"]
    assert (mha["encoder"], mha["attention"], mha["decoder_attention"]) == (
        "conformer", "mha", "mha")
    assert (mha["lm"], mha["lm_weight"]) == (None, None)
    assert (lm["lm"], lm["lm_weight"]) == ("lm_tiny", 0.6)  # inference_args over the config's 0.3
    converted = rows[f"asr_conformer_mha_to_mla/{DECODE}"]
    assert (converted["attention"], converted["decoder_attention"]) == ("mla (from mha)",) * 2
    assert rows[f"asr_conformer_mha_ft/{DECODE}"]["attention"] == "mha"
    mamba = rows[f"asr_conmamba/{DECODE}"]
    assert (mamba["encoder"], mamba["attention"], mamba["decoder_attention"]) == (
        "conmamba", "-", "mha")
    assert rows[f"asr_branchformer_mla/{DECODE}"]["encoder"] == "branchformer"


def test_profiled_numbers_are_weighted_by_utterances(report):
    rows = rows_by_system(report)
    mha = rows[f"asr_conformer_mha/{DECODE}"]
    assert mha["cache_kb_per_utterance"] == pytest.approx((40 * 30 + 60 * 10) / 40)
    assert mha["decode_ms_per_utterance"] == pytest.approx((100 * 30 + 200 * 10) / 40)
    assert mha["rtf"] == pytest.approx((0.1 * 30 + 0.2 * 10) / (60 + 30))
    assert mha["peak_memory_mb"] == 700 and mha["parameters"] == 30_000_000
    mla = rows[f"asr_conformer_mla/{DECODE}"]
    assert mla["cache_ratio_analytic"] == pytest.approx((0.25 * 30 + 0.3 * 10) / 40)
    dc = rows[f"ablation/asr_conmamba_dc/{DECODE}"]
    assert dc["chunking_ratio"] == pytest.approx(500 / 1500)


def test_measured_cache_ratio_is_against_the_mha_sibling_on_shared_test_sets(report):
    rows = rows_by_system(report)
    mla = rows[f"asr_conformer_mla/{DECODE}"]
    assert mla["mha_sibling"] == f"asr_conformer_mha/{DECODE}"
    assert mla["cache_ratio_measured"] == pytest.approx(
        ((10 * 30 + 16 * 10) / 40) / ((40 * 30 + 60 * 10) / 40))
    # Profiled on test_clean only: measured against the sibling's test_clean alone.
    converted = rows[f"asr_conformer_mha_to_mla/{DECODE}"]
    assert converted["cache_ratio_measured"] == pytest.approx(10 / 40)
    assert rows[f"asr_conformer_mha/{DECODE}"]["cache_ratio_measured"] == 1.0
    # The LM decode's sibling is decoded with the same options: itself, unprofiled.
    assert rows[f"asr_conformer_mha/{LM_DECODE}"]["mha_sibling"] == f"asr_conformer_mha/{LM_DECODE}"
    assert rows[f"asr_conformer_mha/{LM_DECODE}"]["cache_ratio_measured"] is None
    assert rows[f"asr_branchformer_mla/{DECODE}"]["mha_sibling"] is None


def test_missing_values_are_missing_never_zero(report):
    rows = rows_by_system(report)
    profiled = ("parameters", "cache_kb_per_utterance", "cache_ratio_analytic",
                "decode_ms_per_utterance", "rtf", "peak_memory_mb")
    branchformer = rows[f"asr_branchformer_mla/{DECODE}"]  # no profile, no sibling, no test_other
    for key in (*profiled, "cache_ratio_measured", "chunking_ratio", "wer_test_other"):
        assert branchformer[key] is None, key
    mamba = rows[f"asr_conmamba/{DECODE}"]  # profiled, stock decoder without a cache
    assert mamba["decode_ms_per_utterance"] == 50 and mamba["cache_kb_per_utterance"] is None
    md = {(r["model"], r["decode"]): r for r in markdown_rows(report / "RESULTS.md")}
    cells = md[("asr_branchformer_mla", DECODE)]
    for label in ("params (M)", "cache KB/utt", "cache/MHA measured", "ms/utt", "RTF", "peak MB",
                  "kept frames", "WER test_other (%)"):
        assert cells[label] == "-", label
    assert md[("asr_conmamba", DECODE)]["cache KB/utt"] == "-"
    with open(report / "results.csv", newline="") as f:
        csv_rows = {f"{r['model']}/{r['decode']}": r for r in csv.DictReader(f)}
    assert all(csv_rows[f"asr_branchformer_mla/{DECODE}"][key] == "" for key in profiled)


def test_csv_parses_back_to_the_numbers_of_results_json(report):
    with open(report / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    systems = results(report)["systems"]
    assert len(csv_rows) == len(systems) == 9
    for parsed, system in zip(csv_rows, systems):
        assert parsed.keys() == system["row"].keys()
        for key, value in system["row"].items():
            if value is None:
                assert parsed[key] == "", key
            elif isinstance(value, bool):
                assert parsed[key] == str(value).lower()
            elif isinstance(value, (int, float)):
                assert type(value)(parsed[key]) == value, key  # full precision
            else:
                assert parsed[key] == value
    # And they are the scorer's numbers.
    word = json.loads((report.parent / "exp/asr_conformer_mha" / DECODE /
                       "test_clean/score_word/result.json").read_text())
    assert systems[0]["row"]["wer_test_clean"] == word["error_rate"] == 25.0
    assert systems[0]["test_sets"]["test_clean"]["scores"]["word"] == word
    assert "per_utterance" not in systems[0]["test_sets"]["test_clean"]["profile"]


def test_a_changed_hypothesis_file_makes_its_row_stale(report):
    rows = rows_by_system(report)
    assert rows[f"asr_conformer_gqa/{DECODE}"]["stale"] is True
    assert [s for s, r in rows.items() if r["stale"]] == [f"asr_conformer_gqa/{DECODE}"]
    md = {r["model"]: r for r in markdown_rows(report / "RESULTS.md")}
    assert md["asr_conformer_gqa"]["stale"] == "STALE" and md["asr_conformer_mla"]["stale"] == ""
    text = (report / "RESULTS.md").read_text()
    assert re.search(rf"STALE asr_conformer_gqa/{DECODE}: exp/asr_conformer_gqa/{DECODE}/"
                     r"test_clean/text has changed", text)
    comparisons = results(report)["comparisons"]
    assert not any("asr_conformer_gqa" in c["a"] + c["b"] for c in comparisons)
    assert results(report)["not_compared"]["conformer: mla -> gqa"] == "stale"


CONVERTED = "asr_conformer_mha_to_mla (conformer mla (from mha))"  # questions about it begin so


def comparisons_of(report, question) -> list[dict]:
    return [c for c in results(report)["comparisons"] if c["question"] == question]


def test_identical_hypotheses_differ_by_zero_and_a_better_system_excludes_zero(report):
    converted = comparisons_of(report, f"{CONVERTED}: trained from scratch -> converted")
    assert [(c["a"], c["b"], c["test_set"]) for c in converted] == [
        (f"asr_conformer_mla/{DECODE}", f"asr_conformer_mha_to_mla/{DECODE}", t) for t in TEST_SETS]
    for c in converted:
        low, high = c["interval_95"]
        assert c["difference"] == 0 and low <= 0 <= high and not c["excludes_zero"]
    mla = comparisons_of(report, "conformer: mha -> mla")
    assert [(c["a"], c["b"], c["test_set"]) for c in mla] == [
        (f"asr_conformer_mha/{DECODE}", f"asr_conformer_mla/{DECODE}", t) for t in TEST_SETS]
    for c in mla:  # MLA is right where MHA got one word in four wrong
        assert (c["error_rate_a"], c["error_rate_b"], c["difference"]) == (25.0, 0.0, -25.0)
        assert c["interval_95"][1] < 0 and c["excludes_zero"]
    table = (report / "RESULTS.md").read_text()
    assert ("| conformer: mha -> mla | asr_conformer_mha | asr_conformer_mla | test_clean | 25.00 "
            "| 0.00 | -25.00 | [-25.00, -25.00] | yes |") in table


def test_every_question_is_answered_or_said_to_be_left_out(report):
    answered = {c["question"] for c in results(report)["comparisons"]}
    assert answered == {
        "conformer: mha -> mla",
        "mla: conformer -> branchformer",
        "conformer mha -> conmamba",
        "conmamba -> conmamba with dynamic chunking",
        f"{CONVERTED}: trained from scratch -> converted",
        f"{CONVERTED}: fine-tuned without conversion -> converted",
    }
    assert [c["test_set"] for c in comparisons_of(report, "mla: conformer -> branchformer")] == [
        "test_clean"]
    # The LM decode is compared with nothing: no other model was decoded with that LM.
    assert not any(LM_DECODE in c["a"] + c["b"] for c in results(report)["comparisons"])
    not_compared = results(report)["not_compared"]
    assert not_compared["conformer: mha -> linear"] == "models absent"
    assert not_compared["branchformer: mha -> mla"] == "models absent"
    text = (report / "RESULTS.md").read_text()
    absent = [line for line in text.splitlines() if line.startswith("Not compared (models absent)")]
    assert len(absent) == 1 and "conformer: mha -> linear" in absent[0]


def test_comparisons_follow_the_configs_not_the_names(tmp_path):
    study = Study(tmp_path)
    study.model("asr_mla", conformer("mha"))  # names that say the opposite of the configs
    study.model("asr_mha", conformer("mla"))
    study.model("asr_conmamba", conformer("gqa", encoder="branchformer_x"))
    for name, quality, kb in (("asr_mla", "poor", 40), ("asr_mha", "perfect", 20),
                              ("asr_conmamba", "mixed", 20)):
        study.decode(name, "test_clean", quality, stats=profile(30, kb=kb))
    main(["--exp_dir", str(study.exp), "--out_dir", str(tmp_path / "out")])
    answered = {(c["question"], c["a"].split("/")[0], c["b"].split("/")[0])
                for c in results(tmp_path / "out")["comparisons"]}
    assert answered == {("conformer: mha -> mla", "asr_mla", "asr_mha")}
    rows = rows_by_system(tmp_path / "out")
    assert rows[f"asr_mha/{DECODE}"]["mha_sibling"] == f"asr_mla/{DECODE}"
    assert rows[f"asr_mha/{DECODE}"]["cache_ratio_measured"] == 0.5
    assert rows[f"asr_conmamba/{DECODE}"]["encoder"] == "branchformer"


def test_what_keeps_a_present_pair_from_being_compared_is_said(small_study, tmp_path):
    small_study.model("asr_mla", conformer("mla"))
    beam_5 = {**NO_LM, "inference_args": "--beam_size 5"}
    small_study.decode("asr_mla", "test_clean", "perfect", decode="decode_beam5", decoding=beam_5)
    main(["--exp_dir", str(small_study.exp), "--out_dir", str(tmp_path / "out")])
    assert results(tmp_path / "out")["not_compared"]["conformer: mha -> mla"] == (
        "no decode with the same options")
    small_study.decode("asr_mla", "test_clean", "perfect")
    (small_study.exp / f"asr_mla/{DECODE}/test_clean/score_word/utterances.json").unlink()
    main(["--exp_dir", str(small_study.exp), "--out_dir", str(tmp_path / "out")])
    reasons = results(tmp_path / "out")["not_compared"]["conformer: mha -> mla"]
    assert "no decode with the same options" in reasons  # the beam-5 decode still
    assert "scored without utterances.json" in reasons


def assert_png(path):
    image = imread(path)  # raises on anything that is not a PNG
    assert image.shape[1] == 1300 and image.shape[0] >= 500  # 6.5 inches at 200 dpi
    assert image.std() > 0  # something was drawn


def test_figures_are_pngs_embedded_in_the_markdown(report):
    names = ["cache_kb.png", "wer_vs_cache.png", "decode_time.png", "encoder_time.png"]
    assert sorted(p.name for p in report.glob("*.png")) == sorted(names)
    text = (report / "RESULTS.md").read_text()
    for name in names:
        assert_png(report / name)
        assert f"]({name})" in text
    assert results(report)["figures"] == names
    assert results(report)["encoder_benchmarks"] == ["benchmarks/benchmark_encoder.json"]


def test_crowded_names_neither_overlap_nor_leave_the_panel():
    figure = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    crowd = [Point(f"asr_conformer_model_{i}", "conformer", "mla", 120 + 2 * i, 55 + 0.2 * i)
             for i in range(6)]
    twins = [Point(name, "conformer", "gqa", 300, 70) for name in ("asr_twin_a", "asr_twin_b")]
    rightmost = Point("asr_conformer_with_a_long_name", "conformer", "mha", 600, 60)
    points = [*crowd, *twins, rightmost]
    axes.scatter([p.x for p in points], [p.y for p in points])

    annotations = name_points(axes, points)

    renderer = figure.canvas.get_renderer()
    boxes = [Text.get_window_extent(a, renderer) for a in annotations]
    assert [a.get_text() for a in annotations][-2:] == ["asr_twin_a\nasr_twin_b", rightmost.label]
    assert all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert max(a.xyann[1] for a in annotations[:6]) > 3  # the crowd's names were moved apart
    panel = axes.get_window_extent(renderer)
    assert all(panel.x0 <= box.x0 and box.x1 <= panel.x1 for box in boxes)
    assert annotations[-1].get_horizontalalignment() == "right"


def test_only_the_figures_the_data_allows(tmp_path, capsys):
    study = Study(tmp_path)
    study.model("asr_conmamba", conmamba())
    study.decode("asr_conmamba", "test_clean", "mixed")  # neither profiled nor benchmarked
    main(["--exp_dir", str(study.exp)])
    assert list((study.exp / "report").glob("*.png")) == []
    assert "## Figures" not in (study.exp / "report/RESULTS.md").read_text()
    assert str(study.exp / "report/results.csv") in capsys.readouterr().out
    main(["--exp_dir", str(study.exp)])  # the report's own folder is not read as a model


def report_error(exp, tmp_path) -> str:
    with pytest.raises(UserError) as error:
        main(["--exp_dir", str(exp), "--out_dir", str(tmp_path / "report")])
    return str(error.value)


def test_nothing_to_report(tmp_path):
    message = report_error(tmp_path / "missing", tmp_path)
    assert "is not a folder" in message and "score_<unit>/result.json" in message
    (tmp_path / "exp/asr_x/decode/test").mkdir(parents=True)
    message = report_error(tmp_path / "exp", tmp_path)
    assert "no scored decode under" in message and "<model>/config.yaml" in message


@pytest.fixture
def small_study(tmp_path):
    study = Study(tmp_path)
    study.model("asr_mha", conformer("mha"))
    study.decode("asr_mha", "test_clean", "poor", stats=profile(30, kb=40))
    return study


@pytest.mark.parametrize("relative, content, problem", [
    (f"asr_mha/{DECODE}/test_clean/score_word/result.json", "{", "not valid JSON"),
    (f"asr_mha/{DECODE}/test_clean/score_word/result.json", '{"unit": "word"}', "lacks name"),
    (f"asr_mha/{DECODE}/test_clean/score_word/utterances.json", "[1]", "expected a non-empty"),
    (f"asr_mha/{DECODE}/test_clean/profile/decode_stats.json", "[]", "expected a JSON object"),
    (f"asr_mha/{DECODE}/test_clean/profile/decode_stats.json", '{"utterances": 3}',
     "lacks 'audio_seconds'"),
    ("asr_mha/config.yaml", "encoder: [conformer", "not valid YAML"),
    ("asr_mha/config.yaml", "decoder: transformer\n", "lacks the encoder name"),
    ("asr_mha/config.yaml", "encoder: conformer_x\nencoder_conf: 3\n", "'encoder_conf' must be"),
])  # fmt: skip
def test_malformed_files_are_named(small_study, tmp_path, relative, content, problem):
    write(small_study.exp / relative, content)
    message = report_error(small_study.exp, tmp_path)
    assert message.startswith(str(small_study.exp / relative)) and problem in message


def test_bad_profile_values_are_named(small_study, tmp_path):
    path = small_study.exp / DECODE.join(["asr_mha/", "/test_clean/profile/decode_stats.json"])
    write(path, json.dumps({**profile(30, kb=40), "rtf": "fast"}))
    assert f"{path}: 'rtf' must be a number" in report_error(small_study.exp, tmp_path)
    broken_cache = profile(30, kb=40)
    del broken_cache["kv_cache"]["beam_bytes_per_utterance"]
    write(path, json.dumps(broken_cache))
    assert f"{path} kv_cache lacks 'beam_bytes_per_utterance'" in report_error(
        small_study.exp, tmp_path)


def test_layout_errors_name_the_folder(small_study, tmp_path):
    (small_study.exp / "asr_mha/config.yaml").unlink()
    message = report_error(small_study.exp, tmp_path)
    assert f"{small_study.exp / 'asr_mha'} holds decodes but no config.yaml" in message
    shallow = small_study.exp / "asr_x/score_word"
    write(shallow / "result.json", "{}")
    assert "too shallow for the layout" in report_error(small_study.exp, tmp_path)


def stale_reasons(study, tmp_path) -> list[str]:
    main(["--exp_dir", str(study.exp), "--out_dir", str(tmp_path / "out")])
    return results(tmp_path / "out")["systems"][0]["stale"]


def test_changed_weights_or_a_missing_stamp_make_a_row_stale(small_study, tmp_path):
    assert stale_reasons(small_study, tmp_path) == []
    write(small_study.exp / "asr_mha/valid.acc.ave.pth", "retrained")
    decode = f"exp/asr_mha/{DECODE}/test_clean"
    assert stale_reasons(small_study, tmp_path) == [
        f"exp/asr_mha/valid.acc.ave.pth has changed since {decode} was made",
        f"exp/asr_mha/valid.acc.ave.pth has changed since {decode}/profile was made",
    ]
    (small_study.exp / f"asr_mha/{DECODE}/test_clean/score_char/.stamp").unlink()
    assert f"{decode}/score_char has no .stamp: nothing records what it was made from" in (
        stale_reasons(small_study, tmp_path))


def test_an_exp_dir_linked_elsewhere_is_read_from_the_recipe_dir(small_study, tmp_path):
    storage = tmp_path.parent / f"{tmp_path.name}_storage"
    small_study.exp.rename(storage)
    small_study.exp.symlink_to(storage)  # as recipes link exp/ to a larger disk
    assert stale_reasons(small_study, tmp_path) == []


def scored(folder, unit) -> float:
    return json.loads((folder / f"score_{unit}/result.json").read_text())["error_rate"]


@pytest.fixture
def seeded_study(tmp_path):
    """asr_mha over three seeds of different quality, asr_mla over one; both decode both sets."""
    study = Study(tmp_path)
    folders = {}
    for seed, quality in ((0, "perfect"), (1, "poor"), (2, "mixed")):
        study.model(f"asr_mha_seed{seed}", conformer("mha"), {"asr_args": f"--seed {seed}"})
        for test_set in TEST_SETS:
            folders[seed, test_set] = study.decode(f"asr_mha_seed{seed}", test_set, quality)
    study.model("asr_mla", conformer("mla"))
    for test_set in TEST_SETS:
        study.decode("asr_mla", test_set, "mixed")
    main(["--exp_dir", str(study.exp), "--out_dir", str(tmp_path / "out"),
          "--bootstrap_samples", "100"])
    return study, folders, tmp_path / "out"


def test_a_model_with_seeds_reads_as_mean_and_sd_over_them(seeded_study):
    study, folders, out = seeded_study
    md = (out / "RESULTS.md").read_text()
    # test_clean WER: 0, 25 (one word in four wrong everywhere), 25 / 3 (every third utterance)
    wer = np.array([0.0, 25.0, 25.0 / 3])
    assert f"| asr_mha | {DECODE} | 3 | {wer.mean():.2f} ± {wer.std(ddof=1):.2f} |" in md
    table = md.split("## Over seeds")[1].split("\n\n")[1].splitlines()
    header = [c.strip() for c in table[0].strip("|").split(" | ")]
    assert header == ["model", "decode", "seeds", *(f"{u} {t} (%) mean ± sd" for u in ("WER", "CER")
                                                    for t in TEST_SETS)]
    cells = dict(zip(header, (c.strip() for c in table[2].strip("|").split(" | "))))
    for test_set in TEST_SETS:
        cer = np.array([scored(folders[seed, test_set], "char") for seed in range(3)])
        assert cer.std() > 0
        assert cells[f"CER {test_set} (%) mean ± sd"] == (
            f"{cer.mean():.2f} ± {cer.std(ddof=1):.2f}")
    assert len(table) == 3  # asr_mla has one seed: no row


def test_the_seeds_spread_is_drawn_per_test_set(seeded_study):
    study, folders, out = seeded_study
    assert_png(out / "wer_over_seeds.png")
    assert "](wer_over_seeds.png)" in (out / "RESULTS.md").read_text()
    style = Style(("conformer_x",), ("mha",))
    panels = {"test_clean": [ErrorBar("asr_mha", "conformer_x", 10.0, 4.0, 3),
                             ErrorBar("asr_mla", "conformer_x", 8.0, None, 1)],
              "test_other": [ErrorBar("asr_mha", "conformer_x", 20.0, 2.0, 3)]}
    figure = wer_over_seeds(panels, out / "drawn.png", style)
    for axes, bars in zip(figure.axes, panels.values()):
        widths = sorted(patch.get_width() for patch in axes.patches)
        assert widths == sorted(b.mean for b in bars)
        caps = sorted({round(x, 6) for line in axes.lines for x in line.get_xdata()})
        # each error bar's caps at mean - sd and mean + sd; none for one seed
        assert caps == sorted({b.mean + s for b in bars if b.sd for s in (-b.sd, b.sd)})
    ticks = figure.axes[0].get_yticks()
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert sorted(zip(ticks, labels)) == [(0, "asr_mla"), (1, "asr_mha")]  # first at the top


def test_one_seed_adds_no_seed_table(small_study, tmp_path):
    main(["--exp_dir", str(small_study.exp), "--out_dir", str(tmp_path / "out")])
    assert "Over seeds" not in (tmp_path / "out/RESULTS.md").read_text()
    assert not (tmp_path / "out/wer_over_seeds.png").exists()


def test_comparisons_are_pooled_over_seeds(tmp_path):
    study = Study(tmp_path)
    for seed in (0, 1):
        study.model(f"asr_mha_seed{seed}", conformer("mha"), {"asr_args": f"--seed {seed}"})
        study.decode(f"asr_mha_seed{seed}", "test_clean", "poor")
        study.model(f"asr_mla_seed{seed}", conformer("mla"), {"asr_args": f"--seed {seed}"})
        study.decode(f"asr_mla_seed{seed}", "test_clean", "perfect")
    # The same config without a seed (a recipe's main job): the seeds answer without it.
    study.model("asr_mla_main_job", conformer("mla"))
    study.decode("asr_mla_main_job", "test_clean", "mixed")
    main(["--exp_dir", str(study.exp), "--out_dir", str(tmp_path / "out"),
          "--bootstrap_samples", "200"])
    pooled = [c for c in json.loads((tmp_path / "out/results.json").read_text())["comparisons"]
              if c["question"] == "conformer: mha -> mla (pooled over seeds)"]
    assert len(pooled) == 1 and pooled[0]["a"] == f"asr_mha/{DECODE}"
    # every seed of A 25 % WER, every seed of B 0 %: -25 points, no seed spread
    assert (pooled[0]["seeds_a"], pooled[0]["seeds_b"]) == (2, 2)
    assert pooled[0]["difference"] == pytest.approx(-25)
    assert pooled[0]["interval_95"] == pytest.approx([-25, -25])
    assert pooled[0]["seed_share"] == 0
    md = (tmp_path / "out/RESULTS.md").read_text().split("## Comparisons")[1]
    rows = [[c.strip() for c in line.strip("|").split(" | ")]
            for line in md.split("\n\n")[1].splitlines()]
    share = rows[0].index("seed share")
    by_question = {row[0]: row[share] for row in rows[2:]}
    assert by_question["conformer: mha -> mla (pooled over seeds)"] == "0.00"
    assert by_question["conformer: mha -> mla"] == "-"  # one seed against one
    # Seed by seed, each seed against the same seed only.
    per_seed = {(c["a"].split("/")[0], c["b"].split("/")[0])
                for c in results(tmp_path / "out")["comparisons"]
                if c["question"] == "conformer: mha -> mla"}
    assert per_seed == {("asr_mha_seed0", "asr_mla_seed0"), ("asr_mha_seed1", "asr_mla_seed1")}
    # A cache is measured against the MHA of its own seed.
    siblings = {name: row["mha_sibling"] for name, row in rows_by_system(tmp_path / "out").items()}
    assert siblings[f"asr_mla_seed1/{DECODE}"] == f"asr_mha_seed1/{DECODE}"
    assert siblings[f"asr_mla_seed0/{DECODE}"] == f"asr_mha_seed0/{DECODE}"


def test_a_conversion_with_seeds_is_compared_seed_by_seed_and_pooled(tmp_path):
    """Each seed of a converted model against the same seed of its two references, and one
    pooled row per question over the seeds: the seeds are one model, not three questions."""
    study = Study(tmp_path)
    for seed in (0, 1):
        seeded = {"asr_args": f"--seed {seed}"}
        study.model(f"asr_mha_seed{seed}", conformer("mha"), seeded)
        study.model(f"asr_mla_seed{seed}", conformer("mla"), seeded)
        study.model(f"asr_mha_ft_seed{seed}", conformer("mha"),
                    {"finetune_from": f"exp/asr_mha_seed{seed}", "convert_args": "", **seeded})
        study.model(f"asr_mha2mla_seed{seed}", conformer("mla"),
                    {"finetune_from": f"exp/asr_mha_seed{seed}", "convert_args": "--target mla",
                     **seeded},
                    conversion={"target": "mla", "source": {
                        "config": f"exp/asr_mha_seed{seed}/config.yaml", "model": "x.pth"}})
        for name, quality in (("asr_mha", "poor"), ("asr_mla", "poor"), ("asr_mha_ft", "poor"),
                              ("asr_mha2mla", "perfect")):
            study.decode(f"{name}_seed{seed}", "test_clean", quality)
    main(["--exp_dir", str(study.exp), "--out_dir", str(tmp_path / "out"),
          "--bootstrap_samples", "100"])
    what = "asr_mha2mla (conformer mla (from mha))"
    found = {}
    for c in results(tmp_path / "out")["comparisons"]:
        if c["question"].startswith(what):
            found.setdefault(c["question"][len(what) + 2:], []).append(c)
    for question, reference in (("trained from scratch -> converted", "asr_mla"),
                                ("fine-tuned without conversion -> converted", "asr_mha_ft")):
        assert {(c["a"].split("/")[0], c["b"].split("/")[0]) for c in found[question]} == {
            (f"{reference}_seed{k}", f"asr_mha2mla_seed{k}") for k in (0, 1)}
        (pooled,) = found[f"{question} (pooled over seeds)"]
        assert pooled["a"] == f"{reference}/{DECODE}" and pooled["b"] == f"asr_mha2mla/{DECODE}"
        assert (pooled["seeds_a"], pooled["seeds_b"]) == (2, 2)
        assert pooled["difference"] == pytest.approx(-25)  # 25 % WER against 0 on every seed


def test_the_seed_share_column_shows_results_json(tmp_path):
    study = Study(tmp_path)
    for seed, (mha, mla) in enumerate((("poor", "perfect"), ("mixed", "poor"))):
        study.model(f"asr_mha_seed{seed}", conformer("mha"), {"asr_args": f"--seed {seed}"})
        study.decode(f"asr_mha_seed{seed}", "test_clean", mha)
        study.model(f"asr_mla_seed{seed}", conformer("mla"), {"asr_args": f"--seed {seed}"})
        study.decode(f"asr_mla_seed{seed}", "test_clean", mla)
    main(["--exp_dir", str(study.exp), "--out_dir", str(tmp_path / "out"),
          "--bootstrap_samples", "200"])
    pooled = [c for c in json.loads((tmp_path / "out/results.json").read_text())["comparisons"]
              if c["question"].endswith("(pooled over seeds)")]
    assert len(pooled) == 1 and 0 < pooled[0]["seed_share"] < 1  # the seeds disagree
    assert f"| {pooled[0]['seed_share']:.2f} |" in (tmp_path / "out/RESULTS.md").read_text()


def kv_batch(rows, budget_mb=None, largest=None):
    """A benchmark_kv_batch JSON of one model, as stage 10 writes it: rows (batch size, seconds,
    peak MB)."""
    return {"models": [{"model": "config", "memory_budget_mb": budget_mb,
                        "largest_batch_within_budget": largest,
                        "rows": [{"batch_size": b, "seconds": s, "utterances_per_second": b / s,
                                  "peak_bytes": mb * 2**20} for b, s, mb in rows]}]}


def test_batched_decoding_columns_and_figure(tmp_path):
    study = Study(tmp_path)
    study.model("asr_mha", conformer("mha"))
    study.model("asr_mla", conformer("mla"))
    for name in ("asr_mha", "asr_mla"):
        for test_set in TEST_SETS:
            study.decode(name, test_set, "poor", stats=profile(30, kb=40))
    def batches_file(model, test_set):
        return study.exp / model / DECODE / test_set / "profile" / "kv_batch.json"

    # MHA: 8 utterances in 4 s on one test set, in 2 s on the other: 16 / 6 utt/s at batch 8;
    # its budget fits batch 8 on one test set and batch 1 only on the other.
    for test_set, seconds, largest in zip(TEST_SETS, (4.0, 2.0), (8, 1)):
        write(batches_file("asr_mha", test_set),
              json.dumps(kv_batch([(1, 1.0, 100), (8, seconds, 300)], 200, largest)))
    write(batches_file("asr_mla", "test_clean"), json.dumps(kv_batch([(1, 1.0, 50), (4, 1.0, 80)])))
    out = tmp_path / "out"
    main(["--exp_dir", str(study.exp), "--out_dir", str(out)])
    rows = rows_by_system(out)
    mha, mla = rows[f"asr_mha/{DECODE}"], rows[f"asr_mla/{DECODE}"]
    assert (mha["batch_size"], mha["largest_batch_within_budget"]) == (8, 1)
    assert mha["batch_utterances_per_second"] == pytest.approx(16 / 6)
    assert (mla["batch_size"], mla["batch_utterances_per_second"]) == (4, 4.0)
    assert mla["largest_batch_within_budget"] is None  # no budget given
    assert "batch in budget" in (out / "RESULTS.md").read_text()
    assert "batch_throughput.png" in results(out)["figures"]
    assert_png(out / "batch_throughput.png")


def test_a_malformed_batch_profile_is_named(small_study, tmp_path):
    path = small_study.exp / DECODE.join(["asr_mha/", "/test_clean/profile/kv_batch.json"])
    write(path, json.dumps(kv_batch([(2, -1.0, 10)])))
    assert f"{path} row 0: 'seconds' must be a positive number" in report_error(
        small_study.exp, tmp_path)


def test_chunking_is_compared_at_the_same_frame_rate_and_a_conversion_with_its_own_design(
        tmp_path):
    """The control of a dynamic-chunking model has its input layer (frame rate), and so has the
    ConMamba a Conformer is compared with; a router inserted into a trained model is compared
    with the model trained from scratch with the same router, not with another design."""
    study = Study(tmp_path)
    study.model("asr_conformer", conformer("mha", input_layer="conv2d"))
    design = {"after_block": 2, "target_ratio": 0.5}
    study.model("asr_control", conmamba(input_layer="linear"))
    study.model("asr_other_rate", conmamba(input_layer="conv2d"))
    study.model("asr_dc", conmamba(input_layer="linear", dynamic_chunking=design))
    study.model("asr_chunked_r06", conmamba(input_layer="linear",
                                       dynamic_chunking={**design, "target_ratio": 0.6}))
    study.model("asr_dc_inserted", conmamba(input_layer="linear", dynamic_chunking=design),
                {"finetune_from": "exp/asr_control",
                 "convert_args": "--target dynamic_chunking --after_block 2"},
                conversion={"target": "dynamic_chunking", "source": {
                    "config": "exp/asr_control/config.yaml", "model": "x.pth"}})
    # Fine-tuned without a router at the conv2d rate: its reference is the conv2d model.
    study.model("asr_other_rate_ft", conmamba(input_layer="conv2d"),
                {"finetune_from": "exp/asr_other_rate", "convert_args": ""})
    for name in ("asr_conformer", "asr_control", "asr_other_rate", "asr_dc", "asr_chunked_r06",
                 "asr_dc_inserted", "asr_other_rate_ft"):
        study.decode(name, "test_clean", "mixed")
    main(["--exp_dir", str(study.exp), "--out_dir", str(tmp_path / "out")])
    answered = {(c["question"].split(": ")[-1], c["a"].split("/")[0], c["b"].split("/")[0])
                for c in results(tmp_path / "out")["comparisons"]}
    assert answered == {
        ("conformer mha -> conmamba", "asr_conformer", "asr_other_rate"),
        ("conmamba -> conmamba with dynamic chunking", "asr_control", "asr_dc"),
        ("conmamba -> conmamba with dynamic chunking", "asr_control", "asr_chunked_r06"),
        ("trained from scratch -> converted", "asr_dc", "asr_dc_inserted"),
    }
    assert "asr_dc_inserted (conmamba dynamic chunking inserted): trained from scratch -> " \
        "converted" in {c["question"] for c in results(tmp_path / "out")["comparisons"]}
    # Its closest reference model is the one with its own router, not another design (whose
    # name sorts first).
    rows = rows_by_system(tmp_path / "out")
    assert rows[f"asr_dc_inserted/{DECODE}"]["mha_sibling"] == f"asr_dc/{DECODE}"
    assert rows[f"asr_chunked_r06/{DECODE}"]["mha_sibling"] == f"asr_chunked_r06/{DECODE}"
    assert rows[f"asr_other_rate_ft/{DECODE}"]["mha_sibling"] == f"asr_other_rate/{DECODE}"
