"""`python -m espnet_plugin.bin.benchmark_scan`: this project's selective scan against mambapy's.

Two comparisons on the same numbers, forward without gradients and forward+backward, every
implementation timed in turn within each repeat (the median counts):

- ``scan``: the selective scan alone, (u, delta, A, B, C, D, z, delta_bias) -> silu(z)-gated
  output as mamba_ssm's ``selective_scan_fn(..., delta_softplus=True)`` defines it: ours
  (``selective_scan``: the fused CPU kernels where built), our PyTorch scan, a per-step loop, and
  mambapy's sequential and parallel (pscan) scans with the softplus and the gate around them.
- ``block``: a whole Mamba block (in_proj, causal conv, scan, gate, out_proj): our ``Mamba``
  against mambapy's ``MambaBlock`` in both modes, with our weights copied into it.

Each implementation's float32 error relative to a float64 reference (our PyTorch scan for the
scan, mambapy's parallel block for the block; the output, and for fwd+bwd the largest over all
input and parameter gradients) is printed and written to the JSON with the times. mambapy is an
optional dependency of this benchmark only (``pip install -e .[benchmark]``); without it the
block comparison is skipped. mambapy's sequential mode keeps a graph per frame whose backward
grows with the square of the length (about 100 s for one utterance of 2048 frames), so its
forward+backward only runs with ``--mambapy_sequential_backward``.
"""

import argparse
import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from espnet_plugin.benchmarks.timing import machine_info, median_ms_side_by_side, write_report
from espnet_plugin.nets.mamba import Mamba, kernel_path
from espnet_plugin.nets.scan import pytorch_selective_scan, selective_scan

PASSES = ("fwd", "fwd+bwd")
SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def stepwise_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """The baseline: one state update per frame in Python, autograd through every step.

    Frames are taken with ``unbind`` (one backward node for all of them); indexing frame t of
    the (b, d, l, n) tensors instead would cost a full-size gradient per frame in backward.
    """
    dt = F.softplus(delta + delta_bias[:, None])  # (b, d, l)
    decay = torch.exp(dt[..., None] * A[:, None])  # (b, d, l, n)
    drive = (dt * u)[..., None] * B[:, None].transpose(2, 3)  # (b, d, l, n)
    h, ys = torch.zeros_like(decay[:, :, 0]), []
    for decay_t, drive_t, C_t in zip(decay.unbind(2), drive.unbind(2), C.unbind(2)):
        h = decay_t * h + drive_t
        ys.append((h @ C_t[..., None]).squeeze(-1))
    return (torch.stack(ys, dim=-1) + D[:, None] * u) * F.silu(z)


def mambapy_available() -> bool:
    return importlib.util.find_spec("mambapy") is not None


def mambapy_scan(parallel: bool, d_inner: int, d_state: int) -> Callable:
    """mambapy's scan (it takes (b, l, d) tensors and dt after softplus), with the softplus and
    the gate around it that its MambaBlock applies, so that it computes what the others do."""
    from mambapy.mamba import MambaBlock, MambaConfig

    block = MambaBlock(MambaConfig(d_model=d_inner, n_layers=1, d_state=d_state, expand_factor=1))
    scan = block.selective_scan if parallel else block.selective_scan_seq

    def run(u, delta, A, B, C, D, z, delta_bias):
        dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)
        u, B, C, z = (x.transpose(1, 2) for x in (u, B, C, z))
        return (scan(u, dt, A, B, C, D) * F.silu(z)).transpose(1, 2)

    return run


def scan_implementations(mambapy: bool, d_inner: int, d_state: int) -> dict[str, Callable]:
    implementations = {
        "ours": lambda *x: selective_scan(*x, delta_softplus=True),
        "pytorch_scan": lambda *x: pytorch_selective_scan(*x, delta_softplus=True),
        "stepwise": stepwise_selective_scan,
    }
    if mambapy:
        for mode, parallel in (("mambapy_sequential", False), ("mambapy_parallel", True)):
            implementations[mode] = mambapy_scan(parallel, d_inner, d_state)
    return implementations


def scan_inputs(batch, d_inner, d_state, length, device, dtype=torch.float32):
    """A Mamba layer's scan inputs, (b, d, l) views of time-major tensors as a Mamba block passes
    them; A = -(1..n), D = 1 and delta_bias as mamba_ssm initialises them."""
    g = torch.Generator().manual_seed(0)

    def time_major(channels):
        return torch.randn(batch, length, channels, generator=g).transpose(1, 2)

    x = {"u": time_major(d_inner), "delta": time_major(d_inner), "z": time_major(d_inner)}
    projection = time_major(2 * d_state)  # B and C: two slices of one (b, l, 2n) projection
    x["B"], x["C"] = projection[:, :d_state], projection[:, d_state:]
    x["A"] = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
    x["D"] = torch.ones(d_inner)
    x["delta_bias"] = torch.log(torch.expm1(torch.empty(d_inner).uniform_(0.001, 0.1, generator=g)))
    return [x[name].to(device, dtype) for name in SCAN_INPUTS]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def run_and_gradients(fn: Callable, inputs: list, backward: bool):
    """fn's output, and with backward the gradients of sum(output * w) w.r.t. every leaf."""
    leaves = [x.detach().requires_grad_(backward) for x in inputs]
    with torch.set_grad_enabled(backward):
        out = fn(*leaves)
    if not backward:
        return out.detach(), []
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), [x.grad for x in leaves]


def float32_errors(implementations, inputs32, reference, inputs64, backward) -> dict[str, float]:
    """Per implementation: the largest relative error against the float64 reference of the
    output and, with backward, of every gradient."""
    ref_out, ref_grads = run_and_gradients(reference, inputs64, backward)
    errors = {}
    for name, fn in implementations.items():
        out, grads = run_and_gradients(fn, inputs32, backward)
        errors[name] = max(relative_error(v, r) for v, r in zip([out, *grads], [ref_out, *ref_grads]))
    return errors


def timed_calls(implementations, inputs, backward) -> dict[str, Callable]:
    def call(fn):
        def run():
            run_and_gradients(fn, inputs, backward)

        return run

    return {name: call(fn) for name, fn in implementations.items()}


def benchmark(shape, device, backward, repeats, names=("ours", "pytorch_scan")) -> dict:
    """Median milliseconds of the scan implementations ``names`` at (batch, d_inner, d_state,
    length), timed in turn (the encoder benchmark's per-length scan comparison)."""
    implementations = scan_implementations(False, *shape[1:3])
    implementations = {name: implementations[name] for name in names}
    inputs = scan_inputs(*shape, device=device)
    return median_ms_side_by_side(timed_calls(implementations, inputs, backward), device, repeats)


def mamba_blocks(args, device, mambapy: bool) -> dict[str, torch.nn.Module]:
    """Our Mamba and mambapy's MambaBlock in both modes, all with our block's weights."""
    torch.manual_seed(args.seed)
    ours = Mamba(args.d_model, d_state=args.d_state, expand=args.expand)
    blocks = {"ours": ours}
    if mambapy:
        from mambapy.mamba import MambaBlock, MambaConfig

        for mode, parallel in (("mambapy_sequential", False), ("mambapy_parallel", True)):
            config = MambaConfig(d_model=args.d_model, n_layers=1, d_state=args.d_state,
                                 expand_factor=args.expand, pscan=parallel)
            blocks[mode] = MambaBlock(config)
            blocks[mode].load_state_dict(ours.state_dict())
    return {name: block.to(device) for name, block in blocks.items()}


def block_function(block: torch.nn.Module, names: list[str]) -> Callable:
    """(x, *parameters) -> block(x), the parameters given by name (the blocks register them in
    different orders), so that their gradients count in the error."""

    def run(x, *parameters):
        return torch.func.functional_call(block, dict(zip(names, parameters)), (x,))

    return run


def measure(implementations, inputs32, reference, inputs64, device, args, skip=()) -> list[dict]:
    rows = []
    for backward in (False, True):
        timed = {k: v for k, v in implementations.items() if not (backward and k in skip)}
        ms = median_ms_side_by_side(timed_calls(timed, inputs32, backward), device, args.repeats)
        errors = float32_errors(timed, inputs32, reference, inputs64, backward)
        rows.append({"pass": PASSES[backward], "ms": ms, "float32_error": errors})
    return rows


def compare_scans(args, batch, device, mambapy) -> list[dict]:
    """The scan alone; the float64 reference is our PyTorch scan."""
    d_inner = args.expand * args.d_model
    shape = (batch, d_inner, args.d_state, args.length)
    implementations = scan_implementations(mambapy, d_inner, args.d_state)
    skip = () if args.mambapy_sequential_backward else ("mambapy_sequential",)
    rows = measure(implementations, scan_inputs(*shape, device), implementations["pytorch_scan"],
                   scan_inputs(*shape, device, torch.float64), device, args, skip)
    return [{"level": "scan", "batch": batch, **row} for row in rows]


def compare_blocks(args, batch, device) -> list[dict]:
    """Whole blocks; the float64 reference is our block in float64 (mambapy's rounds A and D to
    float32 whatever the input's precision)."""
    blocks = mamba_blocks(args, device, mambapy=True)
    names = [name for name, _ in blocks["ours"].named_parameters()]
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, args.length, args.d_model, generator=g).to(device)
    inputs32 = [x, *(p.detach() for p in blocks["ours"].parameters())]
    implementations = {name: block_function(block, names) for name, block in blocks.items()}
    skip = () if args.mambapy_sequential_backward else ("mambapy_sequential",)
    rows = measure(implementations, inputs32, implementations["ours"],
                   [v.double() for v in inputs32], device, args, skip)
    return [{"level": "block", "batch": batch, **row} for row in rows]


def summarise(row: dict) -> dict:
    """Speed-ups of ours over every other implementation, and over mambapy's fastest mode."""
    ms = row["ms"]
    row["speedup_of_ours"] = {k: v / ms["ours"] for k, v in ms.items() if k != "ours"}
    mambapy = [v for k, v in ms.items() if k.startswith("mambapy")]
    row["speedup_over_fastest_mambapy"] = min(mambapy) / ms["ours"] if mambapy else None
    return row


def print_rows(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'level':5} {'batch':>5} {'pass':>8} {'implementation':>19} {'ms':>9} "
          f"{'ours is':>9} {'float32 error':>14}")
    for row in rows:
        for name, ms in row["ms"].items():
            faster = "" if name == "ours" else f"{row['speedup_of_ours'][name]:.1f}x"
            print(f"{row['level']:5} {row['batch']:>5} {row['pass']:>8} {name:>19} {ms:9.1f} "
                  f"{faster:>9} {row['float32_error'][name]:14.1e}")
        fastest = row["speedup_over_fastest_mambapy"]
        if fastest is not None:
            print(f"{'':>20} ours vs mambapy's fastest mode: {fastest:.1f}x faster")
    print("ours is: how many times faster ours is; float32 error: largest relative error against "
          "float64 of the output (fwd) and of all gradients (fwd+bwd)")


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--batches", type=int, nargs="+", default=[1, 8], help="utterances per call")
    add("--length", type=int, default=2048, help="frames")
    add("--d_model", type=int, default=144, help="block width (the scan has expand * d_model)")
    add("--d_state", type=int, default=16)
    add("--expand", type=int, default=2)
    add("--repeats", type=int, default=3, help="timed runs per measurement after a warm-up")
    add("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
        help="torch CPU thread counts to run")
    add("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when absent")
    add("--levels", nargs="+", choices=["scan", "block"], default=["scan", "block"])
    add("--mambapy_sequential_backward", action="store_true",
        help="also time mambapy's sequential forward+backward (minutes at 2048 frames)")
    add("--seed", type=int, default=0)
    add("--output", default="benchmark_scan.json", help="JSON file to write")
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> dict:
    args = parse_args(argv)
    mambapy = mambapy_available()
    if not mambapy:
        print("mambapy is not installed (pip install -e .[benchmark]): comparing our own "
              "implementations only")
    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    runs = []
    for device in devices:
        for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            rows = []
            for batch in args.batches:
                if "scan" in args.levels:
                    rows += compare_scans(args, batch, device, mambapy)
                if "block" in args.levels and mambapy:
                    rows += compare_blocks(args, batch, device)
            rows = [summarise(row) for row in rows]
            path = kernel_path(device)
            print_rows(rows, f"\n{device.type}, {threads} torch threads, {args.length} frames, "
                             f"d_model {args.d_model} (scan d_inner {args.expand * args.d_model}), "
                             f"d_state {args.d_state}, median of {args.repeats}; ours: {path}")
            runs.append({"device": device.type, "threads": threads, "ours": path, "rows": rows})
    config = {k: v for k, v in vars(args).items() if k not in ("output", "devices", "threads")}
    report = {"machine": machine_info(devices[-1]), "config": config, "mambapy": mambapy,
              "runs": runs}
    print()
    write_report(args.output, report)
    return report


if __name__ == "__main__":
    main()
