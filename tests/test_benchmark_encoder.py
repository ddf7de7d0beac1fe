"""The encoder benchmark runs end to end on tiny encoders; its JSON is internally consistent
(no timing is asserted)."""

import json
import math

import numpy as np
import torch
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_plugin.benchmarks.encoder import main

SECONDS = [0.5, 1.0, 2.0]


def test_benchmark_reports_consistent_ratios_slopes_and_frames(tmp_path, capsys):
    output = tmp_path / "bench.json"
    argv = ["--seconds", *map(str, SECONDS), "--d_model", "16", "--layers", "2"]
    argv += ["--linear_units", "32", "--heads", "2", "--cnn_module_kernel", "5", "--d_state", "4"]
    argv += ["--repeats", "1", "--threads", "1", "--devices", "cpu", "--output", str(output)]
    main(argv)
    report = json.loads(output.read_text())
    (run,) = report["runs"]
    assert (run["device"], run["threads"]) == ("cpu", 1)
    rows = run["encoders"]
    assert [(r["seconds"], r["pass"]) for r in rows] == [
        (s, p) for s in SECONDS for p in ("fwd", "fwd+bwd")
    ]
    for r in rows:
        assert math.isclose(r["ratio"], r["conmamba_ms"] / r["conformer_ms"])
        for name in ("conformer", "conmamba"):
            assert math.isclose(r[f"{name}_ms_per_second"], r[f"{name}_ms"] / r["seconds"])
        # The encoder frames are those ESPnet's own Conformer outputs for that input.
        conformer = ConformerEncoder(80, output_size=16, attention_heads=2, linear_units=32,
                                     num_blocks=1)
        xs = torch.zeros(1, r["input_frames"], 80)
        assert r["input_frames"] == round(r["seconds"] * 100)
        assert conformer(xs, torch.tensor([r["input_frames"]]))[0].size(1) == r["encoder_frames"]
    for pass_, models in run["growth"].items():
        measured = [r for r in rows if r["pass"] == pass_]
        for name, g in models.items():
            times = [r[f"{name}_ms"] for r in measured]
            slope = np.polyfit(np.log(SECONDS), np.log(times), 1)[0]
            assert math.isclose(g["slope"], slope, rel_tol=1e-6, abs_tol=1e-9)
            first_step = math.log(times[1] / times[0]) / math.log(SECONDS[1] / SECONDS[0])
            assert math.isclose(g["step_slopes"][0], first_step, rel_tol=1e-6, abs_tol=1e-9)
    frames = sorted({r["encoder_frames"] for r in rows})
    assert [(r["frames"], r["pass"]) for r in run["scan"]] == [
        (f, p) for f in frames for p in ("fwd", "fwd+bwd")
    ]
    for r in run["scan"]:
        assert math.isclose(r["speedup"], r["pytorch_scan_ms"] / r["ours_ms"])
    assert run["mamba_path"] in ("cpu_kernels", "pytorch")
    out = capsys.readouterr().out
    assert "ConMamba / Conformer" in out and "log-log slope" in out
