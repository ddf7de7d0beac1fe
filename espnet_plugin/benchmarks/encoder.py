"""`python -m espnet_plugin.bin.benchmark_encoder`: ConMamba against ESPnet's Conformer by length.

Times ESPnet's stock ``ConformerEncoder`` (relative positions, macaron FFNs, convolution module)
and our ``ConMambaEncoder`` at the same d_model and depth on 80-dim fbank inputs of growing
length: forward in eval mode without gradients (decoding) and forward + backward in train mode
(training). The two encoders run alternately, repeat by repeat, so that load from other processes
on a shared machine falls on both alike; the median counts. Prints the ConMamba / Conformer ratio
per length, the time per second of audio and the log-log slope of time against length (1:
linear, 2: quadratic), then our selective scan (the fused CPU kernels where built) against our
PyTorch scan at each length's encoder frames (``benchmark_scan``), and writes everything as JSON.
"""

import argparse
import math
import statistics
from typing import Optional, Sequence

import torch
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_plugin.benchmarks import scan as scan_benchmark
from espnet_plugin.benchmarks.timing import machine_info, median_ms_side_by_side, write_report
from espnet_plugin.nets.encoders import ConMambaEncoder, subsampled_lengths
from espnet_plugin.nets.mamba import PATHS, kernel_path

MODELS = ("conformer", "conmamba")
PASSES = ("fwd", "fwd+bwd")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--seconds", type=float, nargs="+", default=[5, 10, 20, 40, 80], help="input lengths")
    add("--frames_per_second", type=int, default=100, help="fbank frames per second of audio")
    add("--input_size", type=int, default=80, help="fbank dimension")
    add("--batch", type=int, default=1, help="utterances per forward, all of the same length")
    add("--d_model", type=int, default=144)
    add("--layers", type=int, default=12)
    add("--linear_units", type=int, default=576)
    add("--heads", type=int, default=4, help="Conformer attention heads")
    add("--cnn_module_kernel", type=int, default=31)
    add("--d_state", type=int, default=16, help="Mamba state size")
    add("--expand", type=int, default=2, help="Mamba inner size over d_model")
    add("--repeats", type=int, default=3, help="timed runs per measurement after a warm-up")
    add("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to run")
    add("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when absent")
    add("--no_scan", action="store_true", help="skip the selective scan comparison")
    add("--seed", type=int, default=0)
    add("--output", default="benchmark_encoder.json", help="JSON file to write")
    return parser.parse_args(argv)


def build_encoders(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """ESPnet's Conformer as its LibriSpeech recipes configure it, and ConMamba of equal size."""
    shared = dict(
        output_size=args.d_model,
        linear_units=args.linear_units,
        num_blocks=args.layers,
        input_layer="conv2d",
        macaron_style=True,
        use_cnn_module=True,
        cnn_module_kernel=args.cnn_module_kernel,
    )
    conformer = ConformerEncoder(
        args.input_size,
        attention_heads=args.heads,
        rel_pos_type="latest",
        pos_enc_layer_type="rel_pos",
        selfattention_layer_type="rel_selfattn",
        **shared,
    )
    mamba_conf = {"bidirectional": "shared", "d_state": args.d_state, "expand": args.expand}
    conmamba = ConMambaEncoder(args.input_size, mamba_conf=mamba_conf, **shared)
    return {"conformer": conformer, "conmamba": conmamba}


def encoder_call(encoder: torch.nn.Module, xs: torch.Tensor, backward: bool):
    """One decoding forward (eval, no gradients) or one training step's forward + backward."""
    lengths = torch.full((xs.size(0),), xs.size(1), dtype=torch.long, device=xs.device)

    def run():
        if backward:
            encoder.train()
            encoder.zero_grad(set_to_none=True)
            encoder(xs, lengths)[0].sum().backward()
        else:
            encoder.eval()
            with torch.no_grad():
                encoder(xs, lengths)

    return run


def loglog_slope(seconds: Sequence[float], ms: Sequence[float]) -> float:
    """Least-squares slope of log(time) against log(length): the exponent p in time ~ length^p."""
    x, y = [math.log(s) for s in seconds], [math.log(t) for t in ms]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def time_encoders(encoders, args, device: torch.device) -> list[dict]:
    rows = []
    for seconds in args.seconds:
        frames = round(seconds * args.frames_per_second)
        xs = torch.randn(args.batch, frames, args.input_size, device=device)
        encoder_frames = int(subsampled_lengths(encoders["conmamba"].embed, torch.tensor([frames])))
        for backward in (False, True):
            calls = {name: encoder_call(enc, xs, backward) for name, enc in encoders.items()}
            ms = median_ms_side_by_side(calls, device, args.repeats)
            row = {"seconds": seconds, "input_frames": frames, "encoder_frames": encoder_frames,
                   "pass": PASSES[backward]}
            for name in MODELS:
                row[f"{name}_ms"] = ms[name]
                row[f"{name}_ms_per_second"] = ms[name] / seconds
            row["ratio"] = ms["conmamba"] / ms["conformer"]
            rows.append(row)
    return rows


def growth(rows: list[dict]) -> dict:
    """Per pass and model: the overall log-log slope and the slope between successive lengths."""
    out = {}
    for pass_ in PASSES:
        measured = [r for r in rows if r["pass"] == pass_]
        seconds = [r["seconds"] for r in measured]
        out[pass_] = {}
        for name in MODELS:
            ms = [r[f"{name}_ms"] for r in measured]
            out[pass_][name] = {
                "slope": loglog_slope(seconds, ms) if len(ms) > 1 else None,
                "step_slopes": [loglog_slope(seconds[i : i + 2], ms[i : i + 2])
                                for i in range(len(ms) - 1)],
            }
    return out


def time_scans(args, device: torch.device, encoder_frames: Sequence[int]) -> list[dict]:
    """The scan benchmark's ``ours`` and ``pytorch_scan`` at one Mamba layer's shapes."""
    rows = []
    d_inner = args.expand * args.d_model
    for frames in encoder_frames:
        shape = (args.batch, d_inner, args.d_state, frames)
        for backward in (False, True):
            ms = scan_benchmark.benchmark(shape, device, backward, args.repeats)
            rows.append({"frames": frames, "pass": PASSES[backward], "ours_ms": ms["ours"],
                         "pytorch_scan_ms": ms["pytorch_scan"],
                         "speedup": ms["pytorch_scan"] / ms["ours"]})
    return rows


def print_run(run: dict, config: dict) -> None:
    print(f"\n{run['device']}, {run['threads']} torch threads: median of {config['repeats']}, "
          f"batch {config['batch']}; ConMamba's Mamba runs the {PATHS[run['mamba_path']]}")
    print(f"{'speech':>7} {'frames':>6} {'pass':>8} {'Conformer ms':>13} {'ConMamba ms':>12} "
          f"{'ratio':>6} {'Conformer ms/s':>15} {'ConMamba ms/s':>14}")
    for r in run["encoders"]:
        print(f"{r['seconds']:>6g}s {r['encoder_frames']:>6} {r['pass']:>8} "
              f"{r['conformer_ms']:>13.1f} {r['conmamba_ms']:>12.1f} {r['ratio']:>6.2f} "
              f"{r['conformer_ms_per_second']:>15.1f} {r['conmamba_ms_per_second']:>14.1f}")
    print("ratio: ConMamba / Conformer time; ms/s: milliseconds per second of audio")
    for pass_, models in run["growth"].items():
        for name, g in models.items():
            steps = " ".join(f"{s:.2f}" for s in g["step_slopes"])
            slope = "-" if g["slope"] is None else f"{g['slope']:.2f}"
            print(f"log-log slope {pass_:>8} {name:>9}: {slope} (between lengths: {steps})")
    if run["scan"]:
        print(f"selective scan, one direction of one layer (batch {config['batch']}, "
              f"d_inner {config['expand'] * config['d_model']}, d_state {config['d_state']}): "
              f"ours ({run['mamba_path']}) against our PyTorch scan")
        print(f"{'frames':>6} {'pass':>8} {'ours ms':>8} {'PyTorch ms':>11} {'speed-up':>9}")
        for r in run["scan"]:
            print(f"{r['frames']:>6} {r['pass']:>8} {r['ours_ms']:>8.2f} "
                  f"{r['pytorch_scan_ms']:>11.2f} {r['speedup']:>8.1f}x")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    config = {k: v for k, v in vars(args).items() if k not in ("output", "devices", "threads")}
    runs = []
    for device in devices:
        encoders = {name: enc.to(device) for name, enc in build_encoders(args).items()}
        for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            rows = time_encoders(encoders, args, device)
            frames = sorted({r["encoder_frames"] for r in rows})
            run = {"device": device.type, "threads": threads, "mamba_path": kernel_path(device),
                   "encoders": rows, "growth": growth(rows),
                   "scan": [] if args.no_scan else time_scans(args, device, frames)}
            print_run(run, config)
            runs.append(run)
    report = {"machine": machine_info(devices[-1]), "config": config, "runs": runs}
    print()
    write_report(args.output, report)
    return report


if __name__ == "__main__":
    main()
