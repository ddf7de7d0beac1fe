"""MHA -> MLA / GQA conversion of one attention module, against the original module's outputs in
float64: exact where the conversion keeps everything, no worse as it keeps more, and the converted
module's cache and incremental decoding behave like any MLA's."""

import pytest
import torch

from espnet_plugin.compat import nets_module
from espnet_plugin.nets.attention import (
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    cache_nbytes,
)
from espnet_plugin.nets.attention_conversion import (
    max_kv_latent_dim,
    pair_norm_scores,
    select_rope_pairs,
    to_gqa,
    to_mla,
)

StockMHA = nets_module("pytorch_backend.transformer.attention").MultiHeadedAttention
D_MODEL, HEADS, HEAD_DIM = 32, 4, 8


def mha(rotary: bool, seed: int = 0) -> MultiHeadAttention:
    torch.manual_seed(seed)
    module = MultiHeadAttention(D_MODEL, HEADS, rotary=rotary).double().eval()
    with torch.no_grad():  # biases as a trained model has them, not zero
        for linear in (module.linear_q, module.linear_k, module.linear_v, module.linear_out):
            linear.bias.normal_()
    return module


def inputs(seed: int = 1, batch: int = 2, time: int = 9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, time, D_MODEL, generator=g, dtype=torch.float64)
    mask = torch.ones(batch, time, dtype=torch.bool)
    mask[-1, time - 3:] = False  # the last utterance is padded
    return x, mask


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def encoder_error(original, converted, x, mask) -> float:
    """Non-causal self-attention over the valid frames (padded queries left out)."""
    valid = mask[..., None]
    return relative_error(converted(x, mask) * valid, original(x, mask) * valid)


def cross_outputs(module, x, source, mask):
    return module.attend(x, module.memory(source, mask))


def test_cross_attention_at_full_rank_is_exact():
    original = mha(rotary=False)
    x, mask = inputs()
    source, _ = inputs(seed=2, time=11)
    source_mask = torch.ones(2, 11, dtype=torch.bool)
    source_mask[0, 8:] = False
    for factorization in ("joint", "split"):
        converted = to_mla(original, 2 * D_MODEL, factorization=factorization)
        assert converted.tail_energy < 1e-20
        error = relative_error(cross_outputs(converted.attention.eval(), x, source, source_mask),
                               cross_outputs(original, x, source, source_mask))
        assert error < 1e-10, (factorization, error)
    in_float32 = to_mla(original, 2 * D_MODEL).attention.float().eval()
    error = relative_error(cross_outputs(in_float32, x.float(), source.float(), source_mask),
                           cross_outputs(original.float(), x.float(), source.float(), source_mask))
    assert error < 1e-5


def test_espnets_stock_attention_converts_exactly():
    torch.manual_seed(0)
    stock = StockMHA(HEADS, D_MODEL, 0.0).double().eval()
    x, _ = inputs()
    source, _ = inputs(seed=2, time=11)
    expected = stock(x, source, source, torch.ones(2, 1, 11, dtype=torch.bool))
    converted = to_mla(stock, 2 * D_MODEL).attention.eval()
    assert relative_error(cross_outputs(converted, x, source, None), expected) < 1e-10
    gqa = to_gqa(stock, HEADS).eval()
    assert relative_error(cross_outputs(gqa, x, source, None), expected) < 1e-10


def test_rotary_self_attention_with_every_pair_and_full_rank_is_exact():
    original = mha(rotary=True)
    x, mask = inputs()
    converted = to_mla(original, max_kv_latent_dim(HEAD_DIM, HEADS, HEAD_DIM), rope_dim=HEAD_DIM,
                       rope_key_heads=HEADS, rope_pairs=torch.arange(HEAD_DIM // 2))
    mla = converted.attention.eval()
    assert encoder_error(original, mla, x, mask) < 1e-10
    assert relative_error(mla.causal(x)[0], original.causal(x)[0]) < 1e-10
    mla.train()  # the naive read (training) agrees with the absorbed one
    assert encoder_error(original, mla, x, mask) < 1e-10


def test_one_shared_rotary_key_is_exact_for_heads_whose_keys_are_scaled_rotations():
    """k_h = a_h s for complex a_h: the principal direction recovers s, the queries absorb a_h."""
    original = mha(rotary=True)
    half = HEAD_DIM // 2
    with torch.no_grad():
        k = original.linear_k.weight.view(HEADS, HEAD_DIM, D_MODEL)
        kb = original.linear_k.bias.view(HEADS, HEAD_DIM)
        base = torch.complex(k[0, :half], k[0, half:])
        base_bias = torch.complex(kb[0, :half], kb[0, half:])
        for h in range(1, HEADS):
            a = torch.polar(torch.rand(half, dtype=torch.float64) + 0.5,
                            torch.rand(half, dtype=torch.float64) * 6)
            k[h] = torch.cat(((a[:, None] * base).real, (a[:, None] * base).imag))
            kb[h] = torch.cat(((a * base_bias).real, (a * base_bias).imag))
    x, mask = inputs()
    converted = to_mla(original, max_kv_latent_dim(HEAD_DIM, HEADS, HEAD_DIM), rope_dim=HEAD_DIM,
                       rope_key_heads=1, rope_pairs=torch.arange(half))
    assert encoder_error(original, converted.attention.eval(), x, mask) < 1e-10
    # ... which the heads' mean key (all a_h = 1) would not be:
    other = to_mla(mha(rotary=True), max_kv_latent_dim(HEAD_DIM, HEADS, HEAD_DIM),
                   rope_dim=HEAD_DIM, rope_key_heads=1, rope_pairs=torch.arange(half))
    assert encoder_error(mha(rotary=True), other.attention.eval(), x, mask) > 1e-3


def test_error_does_not_grow_with_the_latent():
    original = mha(rotary=True)
    x, mask = inputs(time=15)
    pairs = select_rope_pairs("uniform", HEAD_DIM, 4)
    errors = []
    for rank in (4, 8, 16, 32, 48):
        converted = to_mla(original, rank, rope_dim=4, rope_key_heads=HEADS, rope_pairs=pairs)
        errors.append(encoder_error(original, converted.attention.eval(), x, mask))
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > errors[-1]


def test_2norm_keeps_the_pairs_that_matter():
    """Pairs 1 and 3 carry most of q.k: 2norm keeps them, uniform (pairs 0 and 2) does not, and
    the model that keeps them is the closer one."""
    original = mha(rotary=True)
    half = HEAD_DIM // 2
    with torch.no_grad():
        for linear in (original.linear_q, original.linear_k):
            weight = linear.weight.view(HEADS, HEAD_DIM, D_MODEL)
            for pair in (1, 3):
                weight[:, [pair, pair + half]] *= 6.0
    x, mask = inputs(time=40)
    with torch.no_grad():
        q = original.linear_q(x[0]).view(-1, HEADS, HEAD_DIM)
        k = original.linear_k(x[0]).view(-1, HEADS, HEAD_DIM)
    chosen = select_rope_pairs("2norm", HEAD_DIM, 4, pair_norm_scores(q, k))
    assert chosen.tolist() == [1, 3]
    assert select_rope_pairs("uniform", HEAD_DIM, 4).tolist() == [0, 2]
    rank = max_kv_latent_dim(HEAD_DIM, HEADS, 4)
    errors = {
        name: encoder_error(original, to_mla(original, rank, rope_dim=4, rope_key_heads=HEADS,
                                             rope_pairs=pairs).attention.eval(), x, mask)
        for name, pairs in (("2norm", chosen), ("uniform", select_rope_pairs("uniform", HEAD_DIM, 4)))
    }
    assert errors["2norm"] <= errors["uniform"], errors


def test_gqa_with_a_kv_head_per_query_head_is_the_identity():
    original = mha(rotary=True)
    x, mask = inputs()
    assert encoder_error(original, to_gqa(original, HEADS).eval(), x, mask) < 1e-12


def test_mean_pooling_recovers_heads_that_were_identical_in_each_group():
    torch.manual_seed(3)
    grouped = GroupedQueryAttention(D_MODEL, HEADS, n_kv_heads=2).double().eval()
    original = mha(rotary=True)
    with torch.no_grad():  # an MHA whose heads 0,1 and 2,3 share keys and values
        for name in ("linear_k", "linear_v"):
            source, target = getattr(grouped, name), getattr(original, name)
            target.weight.copy_(source.weight.view(2, 1, HEAD_DIM, D_MODEL)
                                .expand(2, 2, HEAD_DIM, D_MODEL).reshape(D_MODEL, D_MODEL))
            target.bias.copy_(source.bias.view(2, 1, HEAD_DIM).expand(2, 2, HEAD_DIM).reshape(-1))
    pooled = to_gqa(original, 2).eval()
    for name in ("linear_k", "linear_v"):
        assert torch.allclose(getattr(pooled, name).weight, getattr(grouped, name).weight)
    x, mask = inputs()
    assert encoder_error(original, pooled, x, mask) < 1e-12


@pytest.mark.parametrize("rope_key_heads", [1, 2])
def test_converted_cache_is_what_it_says_and_steps_equal_the_whole_sequence(rope_key_heads):
    original = mha(rotary=True)
    converted = to_mla(original, 12, rope_dim=4, rope_key_heads=rope_key_heads,
                       rope_pairs=select_rope_pairs("high", HEAD_DIM, 4)).attention.eval()
    x, _ = inputs(batch=1, time=7)
    whole, full_cache = converted.causal(x)
    cache, steps = None, []
    for t in range(x.size(1)):
        out, cache = converted.causal(x[:, t : t + 1], cache, t)
        steps.append(out)
    assert relative_error(torch.cat(steps, dim=1), whole) < 1e-12
    assert cache_nbytes(cache) == converted.cache_bytes(7, torch.float64)
    assert converted.cache_bytes(1) == (12 + rope_key_heads * 4) * 4


def test_bad_conversions_name_what_is_wrong():
    original = mha(rotary=True)
    pairs = torch.arange(2)
    full = max_kv_latent_dim(HEAD_DIM, HEADS, 4)
    with pytest.raises(ValueError, match=rf"kv_latent_dim must lie in 1..{full}"):
        to_mla(original, full + 1, rope_dim=4, rope_pairs=pairs)
    with pytest.raises(ValueError, match="rope_dim must be an even number in 2..8, got 3"):
        select_rope_pairs("uniform", HEAD_DIM, 3)
    with pytest.raises(ValueError, match="unknown rope selection 'low'"):
        select_rope_pairs("low", HEAD_DIM, 4)
    with pytest.raises(ValueError, match="rope_dim must be 0"):
        to_mla(mha(rotary=False), 8, rope_dim=4)
    with pytest.raises(ValueError, match="is not a multi-head attention"):
        to_mla(GroupedQueryAttention(D_MODEL, HEADS, n_kv_heads=2), 8)
    with pytest.raises(ValueError, match=r"n_kv_heads \(3\) must divide"):
        to_gqa(original, 3)


def test_old_mla_checkpoints_still_load():
    """The new options default to the MLA the configs already train: same names and shapes."""
    torch.manual_seed(0)
    old_style = MultiHeadLatentAttention(D_MODEL, HEADS, kv_latent_dim=12, rope_dim=4)
    state = old_style.state_dict()
    assert set(state) == {"query.weight", "kv_down.weight", "kv_norm.weight", "kv_up.weight",
                          "linear_out.weight"}
    MultiHeadLatentAttention(D_MODEL, HEADS, kv_latent_dim=12, rope_dim=4).load_state_dict(state)
