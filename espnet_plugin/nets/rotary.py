"""Rotary position embedding (RoPE, Su et al. 2021), shared by the plugin's attention variants.

RoPE rotates channel pairs by angles proportional to the position, so a query-key dot product
depends only on their distance. A key is rotated once, when it is projected, and can then sit in a
cache unchanged: a decoding step only needs to know its own position (``start``).
"""

from typing import Optional

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotate the last dim of ``x`` (..., time, dim) for positions ``start``, ``start + 1``, ...

    Channel ``i`` is paired with channel ``i + dim / 2``. Pair ``i`` turns by ``position *
    base ** (-2 i / dim)``: nothing is learned or stored. With ``freq_dim``, the pairs are instead
    ``dim / 2`` of the ``freq_dim / 2`` pairs of a RoPE over ``freq_dim`` channels, pair ``i``
    turning like that RoPE's pair ``pairs[i]``: the partial RoPE of an attention converted from
    one with full RoPE (MHA2MLA), where ``pairs``, a buffer saved with the weights, says which of
    its frequencies each layer kept.
    """

    def __init__(self, dim: int, base: float = 10000.0, freq_dim: Optional[int] = None):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"rotary dim must be a positive even number, got {dim}")
        if freq_dim is not None and (freq_dim % 2 or freq_dim < dim):
            raise ValueError(f"rotary freq_dim must be an even number >= dim ({dim}), got {freq_dim}")
        self.dim = dim
        self.base = base
        self.freq_dim = freq_dim
        if freq_dim is not None:
            self.register_buffer("pairs", torch.arange(dim // 2))

    def exponents(self, dtype: torch.dtype, device) -> torch.Tensor:
        """-log_base of each pair's angle per position, (dim / 2,)."""
        if self.freq_dim is None:
            return torch.arange(0, self.dim, 2, dtype=dtype, device=device) / self.dim
        return 2 * self.pairs.to(dtype) / self.freq_dim

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        # Angles in float64 for float64 inputs (exact references), float32 otherwise (half
        # precision positions lose whole radians past a few thousand frames).
        angle_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        exponent = self.exponents(angle_dtype, x.device)
        positions = torch.arange(start, start + x.size(-2), dtype=angle_dtype, device=x.device)
        angles = positions[:, None] * self.base**-exponent  # (time, dim / 2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)

    def extra_repr(self) -> str:
        pairs = "" if self.freq_dim is None else f", pairs of freq_dim={self.freq_dim}"
        return f"dim={self.dim}, base={self.base}{pairs}"
