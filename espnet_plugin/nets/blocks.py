"""Encoder layers that share one structure and differ only in their sequence mixer.

A *mixer* maps ``x`` (batch, time, d_model) to the same shape given ``mask`` (batch, time), True on
valid frames. Bidirectional Mamba and every attention type fit that signature, so ConMamba,
Conformer and Branchformer are the two layer shapes below with a different mixer plugged in, not
one copied encoder per variant. Every convolution here zeroes padded frames first, so an utterance
gives the same output alone or inside a padded batch (in eval mode: BatchNorm's training statistics
still see the whole batch).
"""

import torch
from torch import nn

from espnet_plugin.compat import PositionwiseFeedForward
from espnet_plugin.nets import cpu_kernels


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~mask.unsqueeze(-1), 0.0)


class ConvolutionModule(nn.Module):
    """Conformer convolution: pointwise + GLU, depthwise (padding zeroed first), norm, swish,
    pointwise. ESPnet's own module convolves across padded frames, which leaks into valid ones.

    The pointwise convolutions are applied as the matrix products they are, on (batch, time,
    channels) with their 1x1 kernels: no layout change around them, and faster gradients on CPUs.
    """

    def __init__(self, d_model: int, kernel_size: int = 31):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"cnn_module_kernel must be odd to keep the length, got {kernel_size}")
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise_conv = nn.Conv1d(
            d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model
        )
        self.norm = nn.BatchNorm1d(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = nn.functional.glu(_pointwise(self.pointwise_conv1, x), dim=-1)
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        x = nn.functional.silu(self.norm(self.depthwise(x.transpose(1, 2))))
        return _pointwise(self.pointwise_conv2, x.transpose(1, 2))

    def depthwise(self, x: torch.Tensor) -> torch.Tensor:
        """The depthwise convolution; on CPUs the fused kernel where it is built (PyTorch's runs at
        about 1 GFLOP/s there: 1.3 ms of a 1.6 ms module on 10 s of speech)."""
        if x.device.type != "cpu" or cpu_kernels.extension() is None:
            return self.depthwise_conv(x)
        conv = self.depthwise_conv
        return cpu_kernels.depthwise_conv1d(x, conv.weight[:, 0], conv.bias, conv.padding[0])


def _pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 Conv1d on (batch, time, channels)."""
    return nn.functional.linear(x, conv.weight[..., 0], conv.bias)


class ConvolutionalGatingMLP(nn.Module):
    """Branchformer's local branch (cgMLP): up-projection, convolutional spatial gating unit,
    down-projection; the gate's depthwise convolution sees zeros on padded frames."""

    def __init__(self, d_model: int, linear_units: int, kernel_size: int, dropout_rate: float):
        super().__init__()
        if linear_units % 2 != 0:
            raise ValueError(f"cgmlp_linear_units must be even (split in two halves), got {linear_units}")
        half = linear_units // 2
        self.channel_proj1 = nn.Sequential(nn.Linear(d_model, linear_units), nn.GELU())
        self.gate_norm = nn.LayerNorm(half)
        self.gate_conv = nn.Conv1d(half, half, kernel_size, padding=kernel_size // 2, groups=half)
        # Start as an identity gate: a near-zero convolution plus a bias of one (as the paper does).
        nn.init.normal_(self.gate_conv.weight, std=1e-6)
        nn.init.ones_(self.gate_conv.bias)
        self.dropout = nn.Dropout(dropout_rate)
        self.channel_proj2 = nn.Linear(half, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        residual, gate = self.channel_proj1(x).chunk(2, dim=-1)
        gate = _zero_padding(self.gate_norm(gate), mask)
        gate = self.gate_conv(gate.transpose(1, 2)).transpose(1, 2)
        return self.channel_proj2(self.dropout(residual * gate))


class MacaronBlock(nn.Module):
    """Conformer layer with a swappable mixer: half-step FFN, mixer, convolution, half-step FFN,
    final LayerNorm; every sub-layer pre-normed with a residual connection."""

    def __init__(
        self,
        d_model: int,
        mixer: nn.Module,
        linear_units: int,
        dropout_rate: float,
        macaron_style: bool = True,
        use_cnn_module: bool = True,
        cnn_module_kernel: int = 31,
    ):
        super().__init__()
        self.mixer = mixer
        self.norm_mixer = nn.LayerNorm(d_model)
        self.feed_forward = PositionwiseFeedForward(d_model, linear_units, dropout_rate, nn.SiLU())
        self.norm_ff = nn.LayerNorm(d_model)
        self.feed_forward_macaron = None
        if macaron_style:
            self.feed_forward_macaron = PositionwiseFeedForward(
                d_model, linear_units, dropout_rate, nn.SiLU()
            )
            self.norm_ff_macaron = nn.LayerNorm(d_model)
        self.ff_scale = 0.5 if macaron_style else 1.0
        self.conv_module = None
        if use_cnn_module:
            self.conv_module = ConvolutionModule(d_model, cnn_module_kernel)
            self.norm_conv = nn.LayerNorm(d_model)
        self.norm_final = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.feed_forward_macaron is not None:
            x = x + self.ff_scale * self.dropout(self.feed_forward_macaron(self.norm_ff_macaron(x)))
        x = x + self.dropout(self.mixer(self.norm_mixer(x), mask))
        if self.conv_module is not None:
            x = x + self.dropout(self.conv_module(self.norm_conv(x), mask))
        x = x + self.ff_scale * self.dropout(self.feed_forward(self.norm_ff(x)))
        return self.norm_final(x)


class BranchformerBlock(nn.Module):
    """Branchformer layer with a swappable global mixer: the mixer branch and the cgMLP branch run
    in parallel on the same input and are merged by concatenation and a projection."""

    def __init__(
        self,
        d_model: int,
        mixer: nn.Module,
        cgmlp_linear_units: int,
        cgmlp_conv_kernel: int,
        dropout_rate: float,
    ):
        super().__init__()
        self.mixer = mixer
        self.norm_mixer = nn.LayerNorm(d_model)
        self.cgmlp = ConvolutionalGatingMLP(d_model, cgmlp_linear_units, cgmlp_conv_kernel, dropout_rate)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.merge_proj = nn.Linear(2 * d_model, d_model)
        self.norm_final = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        global_branch = self.dropout(self.mixer(self.norm_mixer(x), mask))
        local_branch = self.dropout(self.cgmlp(self.norm_mlp(x), mask))
        x = x + self.dropout(self.merge_proj(torch.cat([global_branch, local_branch], dim=-1)))
        return self.norm_final(x)
