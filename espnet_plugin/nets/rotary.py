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
        cos, sin = self._cos_sin(start + x.size(-2), x.dtype, x.device)
        cos, sin = cos[start:start + x.size(-2)], sin[start:start + x.size(-2)]
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)

    def _cos_sin(self, positions: int, dtype: torch.dtype, device):
        """cos and sin of every pair's angle at positions 0, 1, ... (at least ``positions``),
        (positions, dim / 2) in ``dtype``: computed once and grown by doubling, as a decoding
        step asks for one position at a time (the same values as computed afresh)."""
        pairs = None if self.freq_dim is None else (self.pairs.data_ptr(), self.pairs._version)
        key = (dtype, device, pairs)
        held = getattr(self, "_tables", (None,))
        held_positions = held[1].size(0) if held[0] == key else 0
        if held_positions >= positions:
            return held[1], held[2]
        size = max(positions, 2 * held_positions, 64)
        # Angles in float64 for float64 inputs (exact references), float32 otherwise (half
        # precision positions lose whole radians past a few thousand frames).
        angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        with torch.inference_mode(False):  # kept for training too, if made while decoding
            exponent = self.exponents(angle_dtype, device)
            angles = (torch.arange(size, dtype=angle_dtype, device=device)[:, None]
                      * self.base**-exponent)  # (positions, dim / 2)
            self._tables = (key, angles.cos().to(dtype), angles.sin().to(dtype))
        return self._tables[1], self._tables[2]

    def extra_repr(self) -> str:
        pairs = "" if self.freq_dim is None else f", pairs of freq_dim={self.freq_dim}"
        return f"dim={self.dim}, base={self.base}{pairs}"
