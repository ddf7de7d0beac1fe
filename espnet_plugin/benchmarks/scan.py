"""`python -m espnet_plugin.bin.benchmark_scan`: chunked PyTorch selective scan vs a per-step loop.

Times forward (no grad) and forward+backward of ``selective_scan`` and of the frame-by-frame loop
that mamba_ssm's ``selective_scan_ref`` runs, at Mamba-layer shapes, prints a table with the
speed-ups and writes the numbers as JSON.
"""

import argparse

import torch
import torch.nn.functional as F

from espnet_plugin.benchmarks.timing import machine_info, median_ms_side_by_side, write_report
from espnet_plugin.nets.scan import selective_scan


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


def chunked_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)


IMPLEMENTATIONS = {"chunked": chunked_selective_scan, "stepwise": stepwise_selective_scan}


def mamba_inputs(batch, d_inner, d_state, length, device, requires_grad):
    """A Mamba layer's inputs: A = -(1..N) and delta_bias as mamba_ssm initialises them."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "u": (batch, d_inner, length),
        "delta": (batch, d_inner, length),
        "B": (batch, d_state, length),
        "C": (batch, d_state, length),
        "z": (batch, d_inner, length),
    }
    x = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    x["A"] = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
    x["D"] = torch.ones(d_inner)
    x["delta_bias"] = torch.log(torch.expm1(torch.empty(d_inner).uniform_(0.001, 0.1, generator=g)))
    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    return [x[name].to(device).requires_grad_(requires_grad) for name in order]


def scan_calls(shape, device, backward):
    """One call per implementation on the same inputs: forward (no grad) or forward+backward."""
    inputs = mamba_inputs(*shape, device=device, requires_grad=backward)

    def call(impl):
        def run():
            if backward:
                impl(*inputs).sum().backward()
            else:
                with torch.no_grad():
                    impl(*inputs)

        return run

    return {name: call(impl) for name, impl in IMPLEMENTATIONS.items()}


def benchmark(shape, device, backward, repeats):
    """Median milliseconds of every implementation, timed in turn."""
    return median_ms_side_by_side(scan_calls(shape, device, backward), device, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d_inner", type=int, default=288)
    parser.add_argument("--d_state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"],
                        help="devices to time on; cuda is skipped when not available")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", default="benchmark_scan.json", help="JSON file to write")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    rows = []
    header = (f"{'device':6} {'frames':>6} {'pass':>8} {'chunked ms':>11} {'stepwise ms':>12} "
              f"{'speed-up':>9}")
    print(f"batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(header)
    for device in devices:
        for length in args.lengths:
            shape = (args.batch, args.d_inner, args.d_state, length)
            for backward in (False, True):
                ms = benchmark(shape, device, backward, args.repeats)
                row = {
                    "device": device.type,
                    "frames": length,
                    "pass": "fwd+bwd" if backward else "fwd",
                    "chunked_ms": ms["chunked"],
                    "stepwise_ms": ms["stepwise"],
                    "speedup": ms["stepwise"] / ms["chunked"],
                }
                rows.append(row)
                print(f"{row['device']:6} {length:6d} {row['pass']:>8} {row['chunked_ms']:11.1f} "
                      f"{row['stepwise_ms']:12.1f} {row['speedup']:8.2f}x")
    config = {k: getattr(args, k) for k in ("batch", "d_inner", "d_state", "repeats")}
    report = {"machine": machine_info(devices[-1]), "config": config, "results": rows}
    write_report(args.output, report)


if __name__ == "__main__":
    main()
