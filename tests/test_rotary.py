"""Rotary position embedding against the rotation written out in complex numbers (float64), at
any start position, with the cos/sin table it keeps between calls."""

import torch

from espnet_plugin.nets.rotary import RotaryEmbedding


def rotated(x: torch.Tensor, start: int, frequencies: torch.Tensor) -> torch.Tensor:
    """Pair i (channels i and i + dim / 2) as a complex number turned by position * freq_i."""
    half = x.size(-1) // 2
    pairs = torch.complex(x[..., :half], x[..., half:])
    positions = torch.arange(start, start + x.size(-2), dtype=torch.float64)
    turned = pairs * torch.polar(torch.ones((), dtype=torch.float64), positions[:, None] * frequencies).to(pairs)
    return torch.cat((turned.real, turned.imag), -1)


def test_rotation_at_every_start_matches_the_complex_rotation():
    rotary = RotaryEmbedding(8)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    frequencies = 10000.0 ** -(torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    for start in (0, 3, 200, 7):  # past its table, then back inside it
        torch.testing.assert_close(rotary(x, start), rotated(x, start, frequencies),
                                   rtol=1e-12, atol=1e-12)


def test_a_kept_table_gives_what_a_fresh_module_computes_and_follows_loaded_pairs():
    long, fresh = RotaryEmbedding(4, freq_dim=8), RotaryEmbedding(4, freq_dim=8)
    x = torch.randn(1, 3, 4)
    long(torch.randn(1, 500, 4))  # a table of 500 positions and more
    assert torch.equal(long(x, 41), fresh(x, 41))
    state = {"pairs": torch.tensor([1, 3])}  # which frequencies of the 8-channel RoPE it keeps
    long.load_state_dict(state)
    frequencies = 10000.0 ** -(2 * state["pairs"].double() / 8)
    torch.testing.assert_close(long(x, 41).double(), rotated(x.double(), 41, frequencies),
                               rtol=0, atol=1e-5)
