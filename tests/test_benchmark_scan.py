"""The scan benchmark runs end to end on small shapes: every implementation computes the same
function within float32 error of the float64 reference, and the JSON's speed-ups are its own
times' ratios (no timing is asserted)."""

import json
import math

import pytest

from espnet_plugin.benchmarks import scan as scan_benchmark

SMALL = ["--length", "70", "--d_model", "16", "--d_state", "4", "--repeats", "1", "--threads", "1",
         "--devices", "cpu"]


def run(tmp_path, *argv):
    output = tmp_path / "bench.json"
    scan_benchmark.main([*SMALL, *argv, "--output", str(output)])
    return json.loads(output.read_text())


def test_every_implementation_agrees_and_speedups_are_time_ratios(tmp_path, capsys):
    pytest.importorskip("mambapy", reason="mambapy is the optional [benchmark] extra")
    report = run(tmp_path, "--batches", "1", "2")
    (run_,) = report["runs"]
    rows = run_["rows"]
    assert [(r["level"], r["batch"], r["pass"]) for r in rows] == [
        (level, batch, pass_) for batch in (1, 2) for level in ("scan", "block")
        for pass_ in ("fwd", "fwd+bwd")
    ]
    for r in rows:
        expected = {"ours", "mambapy_parallel"} | ({"mambapy_sequential"} if r["pass"] == "fwd" else set())
        if r["level"] == "scan":
            expected |= {"pytorch_scan", "stepwise"}
        assert set(r["ms"]) == expected == set(r["float32_error"])
        for name, error in r["float32_error"].items():
            assert error < 1e-5, (r["level"], r["pass"], name)
        for name, speedup in r["speedup_of_ours"].items():
            assert math.isclose(speedup, r["ms"][name] / r["ms"]["ours"])
        fastest = min(ms for name, ms in r["ms"].items() if name.startswith("mambapy"))
        assert math.isclose(r["speedup_over_fastest_mambapy"], fastest / r["ms"]["ours"])
    assert "ours vs mambapy's fastest mode" in capsys.readouterr().out


def test_without_mambapy_only_our_scans_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(scan_benchmark, "mambapy_available", lambda: False)
    report = run(tmp_path, "--batches", "1")
    assert report["mambapy"] is False
    for r in report["runs"][0]["rows"]:
        assert r["level"] == "scan" and set(r["ms"]) == {"ours", "pytorch_scan", "stepwise"}
        assert r["speedup_over_fastest_mambapy"] is None
    assert "mambapy is not installed" in capsys.readouterr().out
