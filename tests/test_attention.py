"""Attention variants against float64 references written here from the papers' formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from espnet_plugin.nets.attention import (
    GroupedQueryAttention,
    GrowingCache,
    KVCache,
    LatentCache,
    MultiHeadAttention,
    build_attention,
    cache_nbytes,
)

D_MODEL, HEADS = 32, 4
OPTIONS = {
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "mla": {"kv_latent_dim": 12, "rope_dim": 4, "q_latent_dim": 10},
    "linear": {},
}
VARIANTS = list(OPTIONS)


def make(variant: str, rotary: bool = True, dtype=torch.float64, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kind = "gqa" if variant == "mqa" else variant
    options = dict(OPTIONS[variant], **overrides)
    if kind == "mla" and not rotary:
        options["rope_dim"] = 0
    attention = build_attention(kind, D_MODEL, HEADS, rotary=rotary, **options)
    return attention.to(dtype).eval()


# ---------------------------------------------------------------- float64 references


def rotate(x, positions):
    """RoPE on the last dim, channel i paired with i + d/2, as complex multiplication."""
    half = x.shape[-1] // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    phase = torch.polar(torch.ones(len(positions), half, dtype=torch.float64),
                        positions[:, None].double() * freqs)
    z = torch.complex(x[..., :half], x[..., half:]) * phase
    return torch.cat((z.real, z.imag), dim=-1)


def linear_map(layer, x):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def heads(x, n):
    """(batch, time, n * d) -> (batch, n, time, d)."""
    return x.reshape(x.shape[0], x.shape[1], n, -1).permute(0, 2, 1, 3)


def softmax_attend(q, k, v, allowed):
    """q (b, h, tq, d), k/v (b, h, tk, .), allowed (b, tq, tk) booleans."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], -math.inf)
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)


def merge(x):
    return x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)


def reference(attention, variant, x, source, allowed, rotary):
    """Output for queries x over keys from ``source``; ``allowed`` (b, tq, tk)."""
    qpos, kpos = torch.arange(x.shape[1]), torch.arange(source.shape[1])
    rot_q = (lambda t: rotate(t, qpos)) if rotary else (lambda t: t)
    rot_k = (lambda t: rotate(t, kpos)) if rotary else (lambda t: t)
    if variant in ("mha", "gqa", "mqa"):
        n_kv = attention.n_kv_heads
        q = rot_q(heads(linear_map(attention.linear_q, x), HEADS))
        k = rot_k(heads(linear_map(attention.linear_k, source), n_kv))
        v = heads(linear_map(attention.linear_v, source), n_kv)
        group = HEADS // n_kv  # query head h reads kv head h // group
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return linear_map(attention.linear_out, merge(softmax_attend(q, k, v, allowed)))
    if variant == "mla":
        r, dr, hd = attention.kv_latent_dim, attention.rope_dim, D_MODEL // HEADS
        down, norm, up = attention.query
        qh = linear_map(down, x)
        qh = qh / torch.sqrt(qh.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
        q = heads(linear_map(up, qh), HEADS)
        q = torch.cat((q[..., :hd], rot_q(q[..., hd:])), -1)
        compressed = linear_map(attention.kv_down, source)
        c = compressed[..., :r]
        c = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6) * attention.kv_norm.weight
        k_rope = rot_k(compressed[..., r:])  # one key for all heads
        kv = heads(linear_map(attention.kv_up, c), HEADS)
        k = torch.cat((kv[..., :hd], k_rope[:, None].expand(-1, HEADS, -1, -1)), -1)
        v = kv[..., hd:]
        assert k.shape[-1] == hd + dr
        return linear_map(attention.linear_out, merge(softmax_attend(q, k, v, allowed)))
    # linear: out_i = sum_j (R phi(q_i) . R phi(k_j)) v_j / (sum_j phi(q_i) . phi(k_j) + eps)
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    q = phi(heads(linear_map(attention.linear_q, x), HEADS))
    k = phi(heads(linear_map(attention.linear_k, source), HEADS))
    v = heads(linear_map(attention.linear_v, source), HEADS)
    mask = allowed[:, None].double()
    numerator = torch.einsum("bhqd,bhkd->bhqk", rot_q(q), rot_k(k)) * mask
    denominator = (torch.einsum("bhqd,bhkd->bhqk", q, k) * mask).sum(-1, keepdim=True)
    context = numerator @ v / (denominator + 1e-6)
    return linear_map(attention.linear_out, merge(context))


def lengths_mask(lengths, time):
    return torch.arange(time)[None] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------- behaviour


@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder_self_attention_matches_reference(variant):
    attention = make(variant)
    x = torch.randn(3, 9, D_MODEL, dtype=torch.float64)
    valid = lengths_mask([9, 6, 2], 9)
    allowed = valid[:, None, :].expand(-1, 9, -1)
    expected = reference(attention, variant, x, x, allowed, rotary=True)
    out = attention(x, valid[:, None, :])  # ESPnet's (batch, 1, time) mask
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_self_attention_matches_reference(variant):
    attention = make(variant)
    x = torch.randn(2, 8, D_MODEL, dtype=torch.float64)
    allowed = torch.ones(8, 8, dtype=torch.bool).tril().expand(2, -1, -1)
    out, _ = attention.causal(x)
    expected = reference(attention, variant, x, x, allowed, rotary=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cross_attention_matches_reference(variant):
    attention = make(variant, rotary=False)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    source = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    valid = lengths_mask([11, 7], 11)
    expected = reference(attention, variant, x, source, valid[:, None].expand(-1, 5, -1), False)
    torch.testing.assert_close(
        attention.attend(x, attention.memory(source, valid)), expected, rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_memory_serves_many_query_rows(variant):
    """A beam shares one utterance: a batch-1 memory gives what a per-row copy gives."""
    attention = make(variant, rotary=False)
    x = torch.randn(4, 1, D_MODEL, dtype=torch.float64)
    source = torch.randn(1, 10, D_MODEL, dtype=torch.float64)
    shared = attention.attend(x, attention.memory(source))
    per_row = attention.attend(x, attention.memory(source.expand(4, -1, -1)))
    torch.testing.assert_close(shared, per_row, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_decoding_equals_full_recomputation(variant, chunk):
    attention = make(variant, dtype=torch.float32)
    x = torch.randn(3, 10, D_MODEL)
    full, _ = attention.causal(x)
    outputs, cache = [], None
    for start in range(0, 10, chunk):
        out, cache = attention.causal(x[:, start : start + chunk], cache, start)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    {}, {"rope_key_heads": 2},  # each rotary key shared by 2 heads
    {"bias": True, "q_latent_dim": 8, "latent_norm": False},  # folded biases, a query latent
])
def test_mla_absorbed_equals_naive(options):
    attention = make("mla", dtype=torch.float32, **options)
    cross = make("mla", rotary=False, dtype=torch.float32)
    x = torch.randn(2, 7, D_MODEL)
    source = torch.randn(2, 12, D_MODEL)
    valid = lengths_mask([12, 5], 12)

    def run(absorb):
        attention.absorb = cross.absorb = absorb
        steps, cache = [], None
        for t in range(7):
            out, cache = attention.causal(x[:, t : t + 1], cache, t)
            steps.append(out)
        return (
            torch.cat(steps, 1),
            attention(x, valid[:, None, :7]),
            cross.attend(x, cross.memory(source, valid)),
        )

    with torch.no_grad():  # where the folded weights are kept between calls
        for absorbed, naive in zip(run(True), run(False)):
            torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5)
        for module in (attention, cross):  # new weights: the folded ones follow
            module.kv_up.weight.mul_(1.5)
            module.linear_out.weight.add_(0.1)
        for absorbed, naive in zip(run(True), run(False)):
            torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_key_value_weights(n_kv_heads):
    torch.manual_seed(0)
    gqa = GroupedQueryAttention(D_MODEL, HEADS, n_kv_heads=n_kv_heads).double().eval()
    mha = MultiHeadAttention(D_MODEL, HEADS).double().eval()
    group, head_dim = HEADS // n_kv_heads, D_MODEL // HEADS
    state = gqa.state_dict()
    for name in ("linear_k", "linear_v"):  # kv head j serves query heads j*group .. j*group+group-1
        for p in ("weight", "bias"):
            t = state[f"{name}.{p}"]
            state[f"{name}.{p}"] = t.reshape(n_kv_heads, head_dim, *t.shape[1:]).repeat_interleave(
                group, 0
            ).reshape(D_MODEL, *t.shape[1:])
    mha.load_state_dict(state)
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(gqa.causal(x)[0], mha.causal(x)[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-10, atol=1e-10)


def test_gqa_with_all_heads_is_mha():
    mha = make("mha")
    gqa = GroupedQueryAttention(D_MODEL, HEADS, n_kv_heads=HEADS).double().eval()
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(gqa.causal(x)[0], mha.causal(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder_padding_invariance(variant):
    attention = make(variant, dtype=torch.float32)
    x = torch.randn(2, 9, D_MODEL)
    x[1, 4:] = 1e3  # garbage in the padding must not leak into valid frames
    valid = lengths_mask([9, 4], 9)
    padded = attention(x, valid)
    alone = attention(x[1:, :4])
    torch.testing.assert_close(padded[1, :4], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_analytic_cache_bytes_equal_measured(variant, dtype):
    attention = make(variant, dtype=dtype)
    cache = None
    for t in range(5):
        _, cache = attention.causal(torch.randn(3, 1, D_MODEL, dtype=dtype), cache, t)
        assert cache_nbytes(cache) == 3 * attention.cache_bytes(t + 1, dtype)
    cross = make(variant, rotary=False, dtype=dtype)
    memory = cross.memory(torch.randn(2, 13, D_MODEL, dtype=dtype))
    assert cache_nbytes(memory.cache) == 2 * cross.cache_bytes(13, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rotary", [True, False])
def test_caches_hold_no_memory_beyond_their_entries(variant, rotary):
    """What a cache keeps alive is its tensors' storages, not just their visible elements: a view
    of a larger projection would hold all of it."""
    attention = make(variant, rotary=rotary, dtype=torch.float32)
    _, cache = attention.causal(torch.randn(2, 3, D_MODEL))
    memory = attention.memory(torch.randn(2, 7, D_MODEL)) if not rotary else None
    for held in (cache, None if memory is None else memory.cache):
        for tensor in held or ():
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_cache_sizes_follow_the_variants_design():
    """Per token: MHA 2 d_model numbers, GQA 2 n_kv head_dim, MLA latent + rope; linear fixed."""
    f32 = torch.float32
    assert make("mha").cache_bytes(10, f32) == 10 * 2 * D_MODEL * 4
    assert make("gqa").cache_bytes(10, f32) == 10 * 2 * 2 * (D_MODEL // HEADS) * 4
    assert make("mla").cache_bytes(10, f32) == 10 * (12 + 4) * 4
    linear = make("linear")
    assert linear.cache_bytes(10, f32) == linear.cache_bytes(1000, f32)


@pytest.mark.parametrize(
    "attention_type, options, named",
    [
        ("sparse", {}, ["'sparse'", "mha, gqa, mla, linear"]),
        ("mha", {"n_kv_heads": 2}, ["n_kv_heads", "rotary"]),
        ("gqa", {}, ["n_kv_heads"]),
        ("gqa", {"n_kv_heads": 3}, ["n_kv_heads (3)", "n_heads (4)"]),
        ("gqa", {"n_kv_heads": 0}, ["n_kv_heads", ">= 1"]),
        ("mla", {"rope_dim": 3}, ["rope_dim", "even"]),
        ("mla", {"rope_dim": 4, "rotary": False}, ["rope_dim", "rotary=False"]),
        ("mla", {"absorb": "yes"}, ["absorb"]),
        ("linear", {"kv_latent_dim": 8}, ["kv_latent_dim", "allowed: rotary"]),
    ],
)
def test_build_attention_rejects_bad_configuration(attention_type, options, named):
    with pytest.raises(ValueError) as error:
        build_attention(attention_type, D_MODEL, HEADS, **options)
    for text in named:
        assert text in str(error.value)


def test_misuse_is_reported():
    attention = make("gqa")
    x = torch.randn(1, 3, D_MODEL, dtype=torch.float64)
    _, cache = attention.causal(x)
    with pytest.raises(ValueError, match="start"):
        attention.causal(x[:, :1], cache, start=2)
    with pytest.raises(ValueError, match="rotary=False"):
        attention.memory(x)
    with pytest.raises(ValueError, match="mask"):
        attention(x, torch.ones(1, 3, 3, dtype=torch.bool))


def test_growing_cache_holds_what_concatenation_holds_and_reorders_rows():
    torch.manual_seed(0)
    steps = [KVCache(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)) for _ in range(40)]
    grown = GrowingCache(steps[0])
    expected = steps[0]
    for step in steps[1:]:  # past GrowingCache.GROWTH: the tensors grow and keep their contents
        view = grown.extend(step)
        expected = expected.extend(step)
    assert grown.length == 40 and view.key.shape == (3, 2, 40, 4)
    torch.testing.assert_close(tuple(view), tuple(expected), rtol=0, atol=0)
    rows = torch.tensor([2, 0, 0])
    grown.select(rows)
    reordered = tuple(t[rows] for t in expected)
    torch.testing.assert_close(tuple(grown.view()), reordered, rtol=0, atol=0)
    latent = GrowingCache(LatentCache(torch.randn(2, 5, 3), torch.randn(2, 5, 2)))
    new = LatentCache(torch.randn(2, 1, 3), torch.randn(2, 1, 2))
    assert latent.extend(new).latent.shape == (2, 6, 3)
    torch.testing.assert_close(latent.view().rope_key[:, -1:], new.rope_key, rtol=0, atol=0)
