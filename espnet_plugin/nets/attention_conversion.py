"""Turn a trained multi-head attention into GQA or MLA without training from scratch.

GQA (Ainslie et al. 2023): the key and value heads of each group are mean-pooled.

MLA (MHA2MLA, Ji et al. 2025; TransMLA): per layer, a few frequency pairs of each head keep
rotating (``rope_pairs``: ``uniform``, ``high`` or by their calibrated ``2norm``), the others stop
and join the head's content channels; the content keys and the values of all heads are factored
through one latent by an SVD in float64 (``joint``: one SVD of them stacked; ``split``: one each,
the latent shared out between them). The rotary keys of a group of heads (all heads, by default)
become one shared key: for each kept pair, the heads' keys written as complex numbers are
approximated by the group's principal direction ``s`` times a complex scale per head, ``k_h ~
a_h s``, the top singular triplet, and ``conj(a_h)`` is folded into head h's query, which
leaves ``q_h . k_h`` as it was. This is exact when the heads' kept keys are scaled and rotated
copies of one another, least-squares best otherwise, and never worse than the heads' mean (the
case a_h = 1). Biases: the value bias moves into the output bias exactly (softmax weights sum to
one); the content key bias is dropped exactly (it adds the same score to every key of a query);
the query and rotary key biases are kept.

Everything here works on one attention module at a time; :mod:`espnet_plugin.convert_attention`
converts an ESPnet experiment.
"""

from typing import NamedTuple, Optional

import torch
from torch import nn

from espnet_plugin.nets.attention import GroupedQueryAttention, MultiHeadLatentAttention

ROPE_SELECTIONS = ("uniform", "high", "2norm")
FACTORIZATIONS = ("joint", "split")


class HeadWeights(NamedTuple):
    """An MHA's projections in float64: weights (n_heads, head_dim, d_model) for q, k, v,
    biases (n_heads, head_dim), the output projection (d_model, d_model) and its bias."""

    q: torch.Tensor
    q_bias: torch.Tensor
    k: torch.Tensor
    k_bias: torch.Tensor
    v: torch.Tensor
    v_bias: torch.Tensor
    out: torch.Tensor
    out_bias: torch.Tensor
    rotary: bool

    @property
    def n_heads(self) -> int:
        return self.q.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q.shape[1]


def is_mha(module: nn.Module) -> bool:
    """This project's MHA (GQA with a key/value head per query head) or ESPnet's stock one."""
    if isinstance(module, GroupedQueryAttention):
        return module.n_kv_heads == module.n_heads
    return type(module).__name__ == "MultiHeadedAttention" and hasattr(module, "linear_q")


def head_weights(module: nn.Module) -> HeadWeights:
    """The projections of ``module`` (see :func:`is_mha`), split by head."""
    if not is_mha(module):
        raise ValueError(f"{type(module).__name__} is not a multi-head attention to convert")
    n_heads = module.n_heads if isinstance(module, GroupedQueryAttention) else module.h
    rotary = isinstance(module, GroupedQueryAttention) and module.rotary is not None

    def split(linear: nn.Linear):
        weight = linear.weight.detach().double()
        bias = (linear.bias.detach().double() if linear.bias is not None
                else weight.new_zeros(weight.shape[0]))
        return weight.view(n_heads, -1, weight.shape[1]), bias.view(n_heads, -1)

    (q, qb), (k, kb), (v, vb) = (split(module.linear_q), split(module.linear_k),
                                 split(module.linear_v))
    out = module.linear_out.weight.detach().double()
    out_bias = (module.linear_out.bias.detach().double() if module.linear_out.bias is not None
                else out.new_zeros(out.shape[0]))
    return HeadWeights(q, qb, k, kb, v, vb, out, out_bias, rotary)


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight.reshape(linear.weight.shape))
        if linear.bias is not None:
            linear.bias.copy_(bias.reshape(linear.bias.shape))


def to_gqa(module: nn.Module, n_kv_heads: int) -> GroupedQueryAttention:
    """GQA with the mean of each group's key and value heads (identity when n_kv_heads is the
    number of heads)."""
    w = head_weights(module)
    if n_kv_heads < 1 or w.n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide the number of heads ({w.n_heads})")
    d_model = w.out.shape[0]
    gqa = GroupedQueryAttention(d_model, w.n_heads, _dropout(module), n_kv_heads=n_kv_heads,
                                rotary=w.rotary).double()

    def pooled(x: torch.Tensor) -> torch.Tensor:  # (n_heads, ...) -> (n_kv_heads, ...)
        return x.view(n_kv_heads, w.n_heads // n_kv_heads, *x.shape[1:]).mean(dim=1)

    _set_linear(gqa.linear_q, w.q, w.q_bias)
    _set_linear(gqa.linear_k, pooled(w.k), pooled(w.k_bias))
    _set_linear(gqa.linear_v, pooled(w.v), pooled(w.v_bias))
    _set_linear(gqa.linear_out, w.out, w.out_bias)
    return gqa


def _dropout(module: nn.Module) -> float:
    if isinstance(module, GroupedQueryAttention):
        return module.dropout
    return module.dropout.p if isinstance(module.dropout, nn.Dropout) else 0.0


def select_rope_pairs(method: str, head_dim: int, rope_dim: int,
                      pair_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (sorted) of the ``rope_dim / 2`` frequency pairs that keep rotating, among a
    head's ``head_dim / 2`` (pair i turns at base^(-2i/head_dim): 0 is the fastest).

    ``uniform``: every k-th pair; ``high``: the fastest; ``2norm``: the largest ``pair_scores``
    (head_dim / 2,), the calibrated size of each pair's share of the attention scores.
    """
    pairs, keep = head_dim // 2, rope_dim // 2
    if method not in ROPE_SELECTIONS:
        raise ValueError(f"unknown rope selection {method!r}; expected one of "
                         f"{', '.join(ROPE_SELECTIONS)}")
    if rope_dim % 2 or not 0 < keep <= pairs:
        raise ValueError(f"rope_dim must be an even number in 2..{head_dim}, got {rope_dim}")
    if method == "uniform":
        return torch.arange(keep) * pairs // keep
    if method == "high":
        return torch.arange(keep)
    if pair_scores is None or pair_scores.shape != (pairs,):
        raise ValueError(f"2norm selection needs one score per frequency pair ({pairs})")
    return pair_scores.topk(keep).indices.sort().values


def pair_norm_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """MHA2MLA's 2-norm criterion for each frequency pair, summed over heads: the mean norm of
    the pair in the (unrotated) queries times that in the keys, an upper bound of the pair's
    share of q.k. ``queries``, ``keys``: (tokens, n_heads, head_dim)."""
    half = queries.shape[-1] // 2

    def pair_norms(x: torch.Tensor) -> torch.Tensor:  # (n_heads, half)
        return torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2).mean(dim=0)

    return (pair_norms(queries.double()) * pair_norms(keys.double())).sum(dim=0)


class Factor(NamedTuple):
    """W ~ up @ down, with the share of W's energy (sum of squared singular values) left out."""

    up: torch.Tensor
    down: torch.Tensor
    tail_energy: float


def low_rank(weight: torch.Tensor, rank: int) -> Factor:
    """Best rank-``rank`` factors of ``weight`` (rows, cols) by SVD, singular values split
    evenly between the factors; beyond ``weight``'s rank the extra latent dims are zero."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    up = weight.new_zeros(weight.shape[0], rank, dtype=torch.float64)
    down = weight.new_zeros(rank, weight.shape[1], dtype=torch.float64)
    up[:, :kept] = u[:, :kept] * root
    down[:kept] = root[:, None] * vh[:kept]
    energy = (s**2).sum()
    tail = float((s[kept:] ** 2).sum() / energy) if energy > 0 else 0.0
    return Factor(up, down, tail)


class MLAConversion(NamedTuple):
    """The converted module and what the conversion left out."""

    attention: MultiHeadLatentAttention
    rope_pairs: Optional[torch.Tensor]
    tail_energy: float  # of the latent's factorization (joint, or both parts together)
    tail_energy_key: Optional[float]  # split only
    tail_energy_value: Optional[float]  # split only

    def report(self) -> dict:
        return {
            "rope_pairs": None if self.rope_pairs is None else self.rope_pairs.tolist(),
            "svd_tail_energy": self.tail_energy,
            "svd_tail_energy_key": self.tail_energy_key,
            "svd_tail_energy_value": self.tail_energy_value,
        }


def max_kv_latent_dim(head_dim: int, n_heads: int, rope_dim: int) -> int:
    """Full rank: the content key channels plus the value channels of all heads."""
    return n_heads * (2 * head_dim - rope_dim)


def _shared_rope_keys(k_rope: torch.Tensor, k_bias: torch.Tensor, groups: int):
    """Per group and kept pair, the principal complex direction of the heads' rotary keys.

    ``k_rope`` (n_heads, rope_dim, d_model) and ``k_bias`` (n_heads, rope_dim), each pair's two
    channels at j and j + rope_dim / 2. Returns the shared keys' weights (groups, rope_dim,
    d_model) and biases (groups, rope_dim), and each head's complex scale (n_heads, rope_dim / 2).
    """
    n_heads, rope_dim, _ = k_rope.shape
    half = rope_dim // 2
    augmented = torch.cat((k_rope, k_bias[..., None]), dim=-1)  # the bias as input "1"
    as_complex = torch.complex(augmented[:, :half], augmented[:, half:])  # (heads, half, d + 1)
    per_group = n_heads // groups
    shared = torch.empty(groups, half, augmented.shape[-1], dtype=torch.complex128)
    scale = torch.empty(n_heads, half, dtype=torch.complex128)
    for g in range(groups):
        heads = slice(g * per_group, (g + 1) * per_group)
        for j in range(half):
            u, s, vh = torch.linalg.svd(as_complex[heads, j], full_matrices=False)
            shared[g, j] = vh[0]
            scale[heads, j] = u[:, 0] * s[0]
    keys = torch.cat((shared.real, shared.imag), dim=1)  # (groups, rope_dim, d + 1)
    return keys[..., :-1], keys[..., -1], scale


def _fold_scale_into_queries(q_rope: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q~ -> conj(a) q~ on each pair of the last-but-one dim (rope_dim), for weights or biases."""
    half = q_rope.shape[1] // 2
    first, second = q_rope[:, :half], q_rope[:, half:]
    shape = (scale.shape[0], half) + (1,) * (q_rope.dim() - 2)
    a, b = scale.real.reshape(shape), scale.imag.reshape(shape)
    return torch.cat((a * first + b * second, a * second - b * first), dim=1)


def to_mla(module: nn.Module, kv_latent_dim: int, rope_dim: int = 0, rope_key_heads: int = 1,
           rope_pairs: Optional[torch.Tensor] = None,
           factorization: str = "joint") -> MLAConversion:
    """MLA computing ``module``'s attention through a ``kv_latent_dim`` latent (see the module
    docstring). For a rotary module, ``rope_pairs`` are the frequency pairs that keep rotating
    (``select_rope_pairs``); without rotary, ``rope_dim`` must be 0."""
    w = head_weights(module)
    n_heads, head_dim, d_model = w.n_heads, w.head_dim, w.out.shape[0]
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"unknown factorization {factorization!r}; expected one of "
                         f"{', '.join(FACTORIZATIONS)}")
    if w.rotary:
        if rope_pairs is None or len(rope_pairs) * 2 != rope_dim:
            raise ValueError(f"a rotary attention needs rope_dim / 2 = {rope_dim // 2} "
                             f"rope_pairs, got {None if rope_pairs is None else len(rope_pairs)}")
        if n_heads % rope_key_heads:
            raise ValueError(f"rope_key_heads ({rope_key_heads}) must divide n_heads ({n_heads})")
    elif rope_dim:
        raise ValueError(f"attention without rotary positions keeps no rotary dims: rope_dim must "
                         f"be 0, got {rope_dim}")
    full = max_kv_latent_dim(head_dim, n_heads, rope_dim)
    if not 1 <= kv_latent_dim <= full:
        raise ValueError(f"kv_latent_dim must lie in 1..{full} (the content key and value "
                         f"channels of all heads: full rank), got {kv_latent_dim}")
    half = head_dim // 2
    if w.rotary:
        rope_pairs = torch.as_tensor(rope_pairs, dtype=torch.long).sort().values
        rope_idx = torch.cat((rope_pairs, rope_pairs + half))
    else:
        rope_idx = torch.empty(0, dtype=torch.long)
    nope_idx = torch.tensor([i for i in range(head_dim) if i not in set(rope_idx.tolist())],
                            dtype=torch.long)
    nope_dim = len(nope_idx)

    # Latent: content keys and values of all heads, rows in kv_up's order (per head: keys, values).
    k_nope, values = w.k[:, nope_idx], w.v
    if factorization == "joint":
        factor = low_rank(torch.cat((k_nope, values), dim=1).reshape(-1, d_model), kv_latent_dim)
        up, down, tail, tail_k, tail_v = factor.up, factor.down, factor.tail_energy, None, None
    else:
        rank_k = min(n_heads * nope_dim, kv_latent_dim // 2)
        rank_v = min(d_model, kv_latent_dim - rank_k)
        rank_k = kv_latent_dim - rank_v
        fk = low_rank(k_nope.reshape(-1, d_model), rank_k)
        fv = low_rank(values.reshape(-1, d_model), rank_v)
        up_k = torch.cat((fk.up, fk.up.new_zeros(fk.up.shape[0], rank_v)), dim=1)
        up_v = torch.cat((fv.up.new_zeros(fv.up.shape[0], rank_k), fv.up), dim=1)
        up = torch.cat((up_k.view(n_heads, nope_dim, -1), up_v.view(n_heads, head_dim, -1)),
                       dim=1).reshape(-1, kv_latent_dim)
        down = torch.cat((fk.down, fv.down))
        energy_k, energy_v = k_nope.pow(2).sum(), values.pow(2).sum()
        tail = float((fk.tail_energy * energy_k + fv.tail_energy * energy_v)
                     / (energy_k + energy_v))
        tail_k, tail_v = fk.tail_energy, fv.tail_energy

    # Queries (rotary part rescaled for the shared keys) and the shared rotary keys.
    q, q_bias = w.q[:, nope_idx], w.q_bias[:, nope_idx]
    rope_rows, rope_bias = w.q.new_zeros(0, d_model), w.q.new_zeros(0)
    if w.rotary:
        keys, key_bias, scale = _shared_rope_keys(w.k[:, rope_idx], w.k_bias[:, rope_idx],
                                                  rope_key_heads)
        q = torch.cat((q, _fold_scale_into_queries(w.q[:, rope_idx], scale)), dim=1)
        q_bias = torch.cat((q_bias, _fold_scale_into_queries(w.q_bias[:, rope_idx], scale)), dim=1)
        rope_rows, rope_bias = keys.reshape(-1, d_model), key_bias.reshape(-1)

    mla = MultiHeadLatentAttention(
        d_model, n_heads, _dropout(module), kv_latent_dim=kv_latent_dim, rope_dim=rope_dim,
        rotary=w.rotary, nope_dim=nope_dim, rope_key_heads=rope_key_heads if w.rotary else 1,
        rope_head_dim=head_dim if w.rotary else None, latent_norm=False, bias=True,
    ).double()
    _set_linear(mla.query, q, q_bias)
    _set_linear(mla.kv_down, torch.cat((down, rope_rows)),
                torch.cat((down.new_zeros(kv_latent_dim), rope_bias)))
    _set_linear(mla.kv_up, up, None)
    _set_linear(mla.linear_out, w.out, w.out_bias + w.out @ w.v_bias.reshape(-1))
    if w.rotary:
        mla.rotary.pairs.copy_(rope_pairs)
    return MLAConversion(mla, rope_pairs if w.rotary else None, tail, tail_k, tail_v)


def mla_options(conversion: MLAConversion) -> dict:
    """The YAML options (attention_conf) that build a module shaped like the converted one."""
    mla = conversion.attention
    options = {"kv_latent_dim": mla.kv_latent_dim, "rope_dim": mla.rope_dim,
               "nope_dim": mla.nope_dim, "latent_norm": False, "bias": True}
    if mla.rope_dim:
        options.update(rope_key_heads=mla.rope_key_heads, rope_head_dim=mla.rotary.freq_dim)
    return options
