"""Mamba's causal convolution and selective scan as fused C++ kernels for CPUs (and the depthwise
convolution of the Conformer convolution module, which PyTorch runs at about 1 GFLOP/s there).

The PyTorch selective scan (:mod:`espnet_plugin.nets.scan`) materialises decays and drives of
every state and is memory-bound; ``espnet_plugin/csrc/mamba_cpu.cpp`` makes them in registers
and walks each block of channels through time once, forward and backward, and can walk time
backwards within each utterance's length so that a bidirectional block reverses no tensor. The
extension is compiled with ``torch.utils.cpp_extension`` the first time it is asked for (by
``tools/install.sh`` at install time) and cached per torch version, CPU capability and checkout under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Where it cannot be built (no
compiler, a failed build) :func:`extension` returns None, once and for all with the reason logged,
and the PyTorch implementations run instead.
"""

import argparse
import functools
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

NAME = "espnet_plugin_mamba_cpu"
SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "mamba_cpu.cpp"


def compiler_flags() -> list[str]:
    """-O3 with OpenMP (torch's intra-op threads), AVX2 and FMA where torch itself uses them;
    -fno-trapping-math lets the compiler vectorise the kernels' clamps and selects."""
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def build_directory() -> Path:
    """One cached build per torch version and CPU capability (a build is valid for both only)
    and per source file: the build names its source's path, so two checkouts sharing one folder
    would each compile again after the other."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    tag = f"torch{torch.__version__}_{torch.backends.cpu.get_cpu_capability()}".replace("+", "_")
    checkout = hashlib.sha1(str(SOURCE).encode()).hexdigest()[:8]
    return Path(root) / f"{NAME}_{tag}_{checkout}"


def use_our_ninja() -> None:
    """Put the ninja this package depends on first on PATH, where torch looks for it: two ninja
    versions (a system one, the virtual environment's) read each other's build log as changed
    commands, so processes with different PATHs would keep compiling the cached build again."""
    try:
        import ninja
    except ImportError:  # torch then uses whichever ninja PATH has, or says it needs one
        return
    ours = Path(ninja.BIN_DIR) / "ninja"
    found = shutil.which("ninja")
    if found is None or Path(found).resolve() != ours.resolve():
        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def build(verbose: bool = False):
    """Compile the extension, or find its cached build, and import it; raises on failure."""
    from torch.utils.cpp_extension import load

    use_our_ninja()
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    return load(
        NAME, [str(SOURCE)], extra_cflags=compiler_flags(), extra_ldflags=["-fopenmp"],
        build_directory=str(directory), verbose=verbose,
    )


@functools.cache
def extension():
    """The compiled extension, or None where it cannot be built (logged once, with the reason)."""
    start = time.perf_counter()
    try:
        module = build()
    except Exception as err:  # no compiler or ninja, a compile or link error, a bad cache
        logger.warning("fused CPU kernels unavailable, using PyTorch's: %s (python -m "
                       "espnet_plugin.bin.build_cpu_kernels --verbose shows the build)", _reason(err))
        return None
    logger.info("fused CPU kernels loaded from %s in %.1f s", build_directory(),
                time.perf_counter() - start)
    return module


def _reason(err: Exception) -> str:
    """The line of a build error that says what went wrong (the compiler's, where there is one)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    telling = [line for line in lines if "error:" in line.lower() or "not found" in line.lower()]
    return f"{type(err).__name__}: {(telling or lines[-1:] or [''])[0]}"


def main(argv=None) -> None:
    """Build the extension now (tools/install.sh does), so that no first forward waits for it."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        build(verbose=args.verbose)
    except Exception as err:
        print(f"fused CPU kernels NOT built ({_reason(err)}); Mamba will run its PyTorch "
              "selective scan on CPUs")
        return
    print(f"fused CPU kernels ready in {time.perf_counter() - start:.0f} s, cached in "
          f"{build_directory()}")


def _lengths(lengths: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if lengths is None else lengths.to("cpu", torch.long).contiguous()


def _needs_gradient(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd must record the call; decoding skips the Function (20 us a call)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, silu, reverse, lengths):
        ctx.options = (padding, silu, reverse)
        ctx.save_for_backward(x, weight, bias, lengths)
        return extension().conv_forward(x, weight, bias, padding, silu, reverse, lengths)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias, lengths = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = extension().conv_backward(
            x, weight, bias, *ctx.options, lengths, grad_out
        )
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _depthwise_conv(x, weight, bias, padding, silu, reverse=False, lengths=None):
    inputs = (x, weight.contiguous(), None if bias is None else bias.contiguous())
    options = (padding, silu, reverse, _lengths(lengths))
    if _needs_gradient(*inputs):
        return _DepthwiseConv.apply(*inputs, *options)
    return extension().conv_forward(*inputs, *options)


def causal_conv1d(x, weight, bias=None, reverse=False, lengths=None):
    """silu(causal depthwise conv1d(x)), x (b, d, l), weight (d, width), bias (d,): causal_conv1d's
    ``causal_conv1d_fn(x, weight, bias, activation="silu")`` on the CPU, output stored time-major.

    reverse: the convolution runs backwards within each of ``lengths`` (b,) (all of l if None), on
    frames in the order of :func:`espnet_plugin.nets.mamba.reverse_within_lengths`, and writes
    each output at its frame; the same as reversing x, convolving and reversing the output back.
    """
    return _depthwise_conv(x, weight, bias, weight.shape[1] - 1, True, reverse, lengths)


def depthwise_conv1d(x, weight, bias=None, padding=0):
    """``F.conv1d(x, weight[:, None], bias, padding=padding, groups=d)`` where that keeps the
    length l (2 padding = width - 1: a Conformer convolution module's), output stored time-major."""
    return _depthwise_conv(x, weight, bias, padding, False)


class _SelectiveScan(torch.autograd.Function):
    """Saves the inputs and the state entering every 64th frame; backward recomputes the rest."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, lengths):
        out, checkpoints = extension().scan_forward(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, lengths, True
        )
        ctx.options = (delta_softplus, reverse)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, lengths, checkpoints)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        *inputs, lengths, checkpoints = ctx.saved_tensors
        grads = extension().scan_backward(*inputs, *ctx.options, lengths, grad_out, checkpoints)
        return (*grads, None, None, None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   reverse=False, lengths=None):
    """:func:`espnet_plugin.nets.scan.selective_scan` on the fused kernel (CPU tensors only);
    ``reverse`` and ``lengths`` as in :func:`causal_conv1d`.

    Computes in float32 at least, as mamba_ssm does, and returns u's dtype (output stored
    time-major).
    """
    dtype = torch.promote_types(u.dtype, torch.float32)

    def cast(x: Optional[torch.Tensor], contiguous: bool = False) -> Optional[torch.Tensor]:
        if x is None:
            return None
        x = x if x.dtype == dtype else x.to(dtype)
        return x.contiguous() if contiguous else x

    inputs = (cast(u), cast(delta), cast(A, True), cast(B), cast(C), cast(D, True), cast(z),
              cast(delta_bias, True))
    options = (delta_softplus, reverse, _lengths(lengths))
    if _needs_gradient(*inputs):
        out = _SelectiveScan.apply(*inputs, *options)
    else:
        out = extension().scan_forward(*inputs, *options, False)[0]
    return out if out.dtype == u.dtype else out.to(u.dtype)
