"""Rotary position embedding (RoPE, Su et al. 2021), shared by the plugin's attention variants.

RoPE rotates channel pairs by angles proportional to the position, so a query-key dot product
depends only on their distance. A key is rotated once, when it is projected, and can then sit in a
cache unchanged: a decoding step only needs to know its own position (``start``).
"""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotate the last dim of ``x`` (..., time, dim) for positions ``start``, ``start + 1``, ...

    Channel ``i`` is paired with channel ``i + dim / 2`` and the pair is rotated by
    ``position * base ** (-2 i / dim)``. Nothing is learned and nothing is stored in a state_dict.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"rotary dim must be a positive even number, got {dim}")
        self.dim = dim
        self.base = base

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        # Angles in float64 for float64 inputs (exact references), float32 otherwise (half
        # precision positions lose whole radians past a few thousand frames).
        angle_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        exponent = torch.arange(0, self.dim, 2, dtype=angle_dtype, device=x.device) / self.dim
        positions = torch.arange(start, start + x.size(-2), dtype=angle_dtype, device=x.device)
        angles = positions[:, None] * self.base**-exponent  # (time, dim / 2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"
