"""Mamba mixers: mamba_ssm's Mamba block and a length-aware bidirectional BiMamba.

Parameter names, shapes and initialisation are those of mamba_ssm's ``Mamba`` (and Vim's
bidirectional extension), so a state_dict moves unchanged between a CUDA machine running the fused
mamba_ssm/causal_conv1d kernels, a CPU running this plugin's fused C++ kernels
(:mod:`espnet_plugin.nets.cpu_kernels`) and anything else running the PyTorch selective scan.
"""

import functools
import logging
import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from espnet_plugin.nets import cpu_kernels
from espnet_plugin.nets.scan import pytorch_selective_scan

logger = logging.getLogger(__name__)

BIDIRECTIONAL_MODES = ("shared", "concat", "none")


class SSMParameters(NamedTuple):
    """The parameters of one scan direction of a Mamba block."""

    conv1d: nn.Conv1d
    x_proj: nn.Linear
    dt_proj: nn.Linear
    A_log: nn.Parameter
    D: nn.Parameter


class FusedKernels(NamedTuple):
    causal_conv1d_fn: Callable
    selective_scan_fn: Callable


@functools.cache
def _fused_kernels() -> Optional[FusedKernels]:
    """mamba_ssm's and causal_conv1d's CUDA kernels, or None where they are not installed.

    mamba_ssm cannot even be imported without its compiled CUDA extension, hence OSError too.
    """
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError) as err:
        logger.info("mamba_ssm/causal_conv1d kernels unavailable: %s", err)
        return None
    return FusedKernels(causal_conv1d_fn, selective_scan_fn)


# What runs Mamba's convolution and scan, by name.
PATHS = {
    "cuda_kernels": "mamba_ssm + causal_conv1d CUDA kernels",
    "cpu_kernels": "fused C++ CPU kernels",
    "pytorch": "PyTorch selective scan",
}


@functools.cache
def _announce_path(device_type: str, path: str) -> None:
    logger.info("Mamba on %s: using the %s", device_type, PATHS[path])


def kernel_path(device: torch.device) -> str:
    """The path (a key of PATHS) that runs Mamba on ``device``: the fused kernels where they
    exist (mamba_ssm's on CUDA, espnet_plugin/csrc's on the CPU), PyTorch otherwise."""
    if device.type == "cuda" and _fused_kernels() is not None:
        path = "cuda_kernels"
    elif device.type == "cpu" and cpu_kernels.extension() is not None:
        path = "cpu_kernels"
    else:
        path = "pytorch"
    _announce_path(device.type, path)
    return path


def selective_ssm(
    x: torch.Tensor,
    z: torch.Tensor,
    p: SSMParameters,
    reverse: bool = False,
    lengths: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One direction of Mamba between in_proj and out_proj: (b, d_inner, l) x, z -> y.

    Causal depthwise conv + SiLU, input-dependent dt, B, C, selective scan, gated by silu(z).
    ``reverse`` (the fused CPU kernels only): the direction runs backwards in time within each of
    ``lengths`` (b,) (None: all l), as on inputs reversed by :func:`reverse_within_lengths`.
    """
    path = kernel_path(x.device)
    if reverse and path != "cpu_kernels":
        raise ValueError(f"selective_ssm: reverse=True needs the fused CPU kernels, not the {path}")
    length = x.shape[-1]
    conv_weight = p.conv1d.weight.squeeze(1)
    if path == "cuda_kernels":
        x = _fused_kernels().causal_conv1d_fn(
            x=x.contiguous(), weight=conv_weight, bias=p.conv1d.bias, activation="silu",
        )
    elif path == "cpu_kernels":
        x = cpu_kernels.causal_conv1d(x, conv_weight, p.conv1d.bias, reverse, lengths)
    else:
        x = F.silu(p.conv1d(x)[..., :length])
    dt_rank, d_state = p.dt_proj.in_features, p.A_log.shape[1]
    dt, B, C = torch.split(p.x_proj(x.transpose(1, 2)), [dt_rank, d_state, d_state], dim=-1)
    dt = F.linear(dt, p.dt_proj.weight).transpose(1, 2)  # its bias is added inside the scan
    B, C = B.transpose(1, 2), C.transpose(1, 2)  # (b, n, l); the fused CPU scan reads any strides
    options = dict(z=z, delta_bias=_at_least_float32(p.dt_proj.bias), delta_softplus=True)
    A, D = -torch.exp(_at_least_float32(p.A_log)), _at_least_float32(p.D)
    if path == "cpu_kernels":
        return cpu_kernels.selective_scan(x, dt, A, B, C, D, **options, reverse=reverse,
                                          lengths=lengths)
    scan = _fused_kernels().selective_scan_fn if path == "cuda_kernels" else pytorch_selective_scan
    return scan(x, dt, A, B.contiguous(), C.contiguous(), D, **options)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """A, D and dt's bias stay float32 under half precision, as in mamba_ssm (float64 stays)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def reverse_within_lengths(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Reverse each sequence of (B, T, ...) in time within its own length; padding stays put.

    Its own inverse. A causal scan over the result never sees padding before a valid frame.
    """
    if lengths is None:
        return x.flip(1)
    t = torch.arange(x.shape[1], device=x.device)
    lengths = lengths.to(x.device)[:, None]
    index = torch.where(t < lengths, lengths - 1 - t, t)  # (B, T)
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand_as(x))


class Mamba(nn.Module):
    """mamba_ssm's Mamba block (mamba_simple.py), causal, on (B, T, d_model).

    Fused CUDA kernels when the input is on CUDA and mamba_ssm + causal_conv1d import,
    otherwise the PyTorch selective scan; both read the same parameters.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init={dt_init!r}, expected 'random' or 'constant'")
        if dt_rank != "auto" and not (isinstance(dt_rank, int) and dt_rank > 0):
            raise ValueError(f"Mamba: dt_rank={dt_rank!r}, expected 'auto' or a positive int")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.conv_bias = conv_bias
        self.dt_init_options = dict(
            dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale,
            dt_init_floor=dt_init_floor,
        )
        # Created in mamba_ssm's order, so that the same seed gives the same weights.
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = self.new_direction()
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def new_direction(self) -> SSMParameters:
        """A scan direction's parameters: conv1d, x_proj, dt_proj, A_log, D (mamba_ssm init)."""
        d_inner = self.d_inner
        p = SSMParameters(
            conv1d=nn.Conv1d(
                d_inner, d_inner, self.d_conv, groups=d_inner, padding=self.d_conv - 1,
                bias=self.conv_bias,
            ),
            x_proj=nn.Linear(d_inner, self.dt_rank + 2 * self.d_state, bias=False),
            dt_proj=nn.Linear(self.dt_rank, d_inner, bias=True),
            A_log=nn.Parameter(torch.empty(d_inner, self.d_state)),
            D=nn.Parameter(torch.empty(d_inner)),
        )
        self.init_direction(p)
        return p

    @torch.no_grad()
    def init_direction(self, p: SSMParameters) -> None:
        """mamba_ssm's init: S4D-real A = -(1..d_state), D = 1, dt = softplus(dt_proj.bias)
        log-uniform in [dt_min, dt_max], dt_proj.weight scaled to keep dt's variance."""
        o = self.dt_init_options
        std = self.dt_rank**-0.5 * o["dt_scale"]
        if o["dt_init"] == "constant":
            nn.init.constant_(p.dt_proj.weight, std)
        else:
            nn.init.uniform_(p.dt_proj.weight, -std, std)
        log_min, log_max = math.log(o["dt_min"]), math.log(o["dt_max"])
        dt = torch.exp(torch.rand(self.d_inner) * (log_max - log_min) + log_min)
        dt = dt.clamp(min=o["dt_init_floor"])
        p.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        p.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)))
        p.D.fill_(1.0)

    def directions(self) -> list[SSMParameters]:
        return [SSMParameters(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)]

    def espnet_initialization_fn(self) -> None:
        """ESPnet's ``--init`` redraws every matrix and zeroes every bias; it calls this after,
        which restores the SSM parameters whose values matter (A, D, dt)."""
        for p in self.directions():
            self.init_direction(p)

    def mix(
        self,
        xz: torch.Tensor,
        p: SSMParameters,
        reverse: bool = False,
        lengths: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """in_proj output (B, T, 2 d_inner) -> gated scan output (B, T, d_inner), one direction;
        ``reverse``: backwards in time within each utterance's length (``lengths``, None: T).

        The fused CPU kernels walk time backwards themselves; elsewhere the input and the output
        are reversed with :func:`reverse_within_lengths`."""
        in_place = reverse and kernel_path(xz.device) == "cpu_kernels"
        if reverse and not in_place:
            xz = reverse_within_lengths(xz, lengths)
        x, z = xz.transpose(1, 2).chunk(2, dim=1)
        y = selective_ssm(x, z, p, in_place, lengths).transpose(1, 2)
        return reverse_within_lengths(y, lengths) if reverse and not in_place else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model); frame t depends on frames <= t only."""
        return self.out_proj(self.mix(self.in_proj(x), self.directions()[0]))


class BiMamba(Mamba):
    """A Mamba mixer that also reads the future, for non-streaming encoders.

    bidirectional:
        "shared": Vim / Mamba-ASR: shared in_proj and out_proj, a second conv1d_b, x_proj_b,
            dt_proj_b, A_b_log, D_b scanning backwards; the two directions are averaged.
        "concat": two full Mambas (mamba_b backwards), concatenated, projected by concat_proj.
        "none": plain causal Mamba.
    Backward scans reverse each utterance within its own length, so padding never reaches a
    valid frame; the outputs at padded frames are meaningless.
    """

    def __init__(self, d_model: int, bidirectional: str = "shared", **mamba_options):
        if bidirectional not in BIDIRECTIONAL_MODES:
            raise ValueError(
                f"BiMamba: bidirectional={bidirectional!r}, expected one of "
                f"{', '.join(repr(m) for m in BIDIRECTIONAL_MODES)}"
            )
        super().__init__(d_model, **mamba_options)
        self.bidirectional = bidirectional
        if bidirectional == "shared":
            self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = (
                self.new_direction()
            )
        elif bidirectional == "concat":
            self.mamba_b = Mamba(d_model, **mamba_options)
            self.concat_proj = nn.Linear(2 * d_model, d_model)

    def directions(self) -> list[SSMParameters]:
        forward = super().directions()
        if self.bidirectional != "shared":
            return forward
        return forward + [
            SSMParameters(self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        ]

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T, d_model), mask (B, T) True on valid frames or None for all T -> (B, T, d_model).

        The encoder blocks' mixer signature, shared with the attention types."""
        lengths = None if mask is None else mask.sum(dim=-1)
        if self.bidirectional == "none":
            return super().forward(x)
        if self.bidirectional == "concat":
            backward = self.mamba_b(reverse_within_lengths(x, lengths))
            backward = reverse_within_lengths(backward, lengths)
            return self.concat_proj(torch.cat([super().forward(x), backward], dim=-1))
        xz = self.in_proj(x)
        forward_dir, backward_dir = self.directions()
        y = self.mix(xz, forward_dir)
        y_b = self.mix(xz, backward_dir, reverse=True, lengths=lengths)
        return self.out_proj((y + y_b) / 2)
