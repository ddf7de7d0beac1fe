"""The decoder benchmark command runs end to end on a tiny model (no timing is asserted)."""

import json

from espnet_plugin.benchmarks.decoder import main


def test_benchmark_decodes_the_same_steps_and_reports_cache_sizes(tmp_path, capsys):
    output = tmp_path / "bench.json"
    argv = ["--seconds", "1", "2", "--d_model", "32", "--linear_units", "64", "--layers", "2"]
    argv += ["--vocab", "20", "--beam", "3", "--repeats", "1", "--output", str(output)]
    main(argv)
    report = json.loads(output.read_text())
    assert [run["steps"] for run in report["decoding"]] == [5, 10]
    assert [run["frames"] for run in report["decoding"]] == [25, 50]
    for run in report["decoding"]:
        assert run["mha_same_best_as_stock"]
        assert set(run["speedup"]) == {"mha", "gqa", "mla", "linear"}
    longest = {name: sizes[-1] for name, sizes in report["cache"].items()}
    # MHA keeps key + value (2 x d_model floats) per token per layer; the GQA setting halves it.
    assert longest["mha"]["self_bytes_per_token"] == 2 * 32 * 2 * 4
    assert longest["gqa"]["self_bytes_per_token"] == 32 * 2 * 4
    assert "speedup over stock" in capsys.readouterr().out
