"""Four attention variants behind one interface: MHA, GQA, MLA and linear attention.

They differ in what a decoder must keep per token to attend to it later, which is what limits beam
search: MHA keeps every head's key and value, GQA shares them between groups of query heads, MLA
keeps one small latent (plus a rotary key) per token, and linear attention keeps a fixed-size
running sum whatever the length. Every variant serves the three uses of an ASR model:

* ``forward(x, mask)``: encoder self-attention, non-causal, padded keys masked out;
* ``causal(x, cache, start)``: decoder self-attention over earlier tokens (``cache``) and ``x``
  itself, causally; it returns the cache extended by ``x``, so training (whole sequence, no
  cache) and beam search (one token at a time) run the same code;
* ``memory(source, mask)`` then ``attend(x, memory)``: cross-attention, the source (encoder
  output) projected once per utterance.

``cache_bytes`` gives a variant's cache size analytically and ``cache_nbytes`` measures a cache
object, so a profiler can compare them. Masks follow ESPnet: True marks a valid (non-padded) key,
shaped (batch, time) or (batch, 1, time). ``build_attention`` makes a variant from a YAML name and
options, for encoder and decoder blocks alike.
"""

import inspect
import math
from abc import ABC, abstractmethod
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from espnet_plugin.nets.rotary import RotaryEmbedding


class KVCache(NamedTuple):
    """MHA/GQA cache: rotated keys and values, each (batch, n_kv_heads, time, head_dim)."""

    key: torch.Tensor
    value: torch.Tensor
    time_dim = 2

    @property
    def length(self) -> int:
        return self.key.size(2)

    def extend(self, new: "KVCache") -> "KVCache":
        return KVCache(torch.cat((self.key, new.key), 2), torch.cat((self.value, new.value), 2))


class LatentCache(NamedTuple):
    """MLA cache: the latent (batch, time, kv_latent_dim) and the rotated keys, each shared by a
    group of heads (batch, time, rope_key_heads * rope_dim); keys and values of every head are
    recovered from these."""

    latent: torch.Tensor
    rope_key: torch.Tensor
    time_dim = 1

    @property
    def length(self) -> int:
        return self.latent.size(1)

    def extend(self, new: "LatentCache") -> "LatentCache":
        return LatentCache(
            torch.cat((self.latent, new.latent), 1), torch.cat((self.rope_key, new.rope_key), 1)
        )


class LinearState(NamedTuple):
    """Linear attention's running sums, the same size whatever the number of tokens summed:
    ``kv`` = sum of phi(k) v^T (batch, heads, head_dim, head_dim), ``k_sum`` = sum of phi(k)
    (batch, heads, head_dim)."""

    kv: torch.Tensor
    k_sum: torch.Tensor
    time_dim = None


Cache = Union[KVCache, LatentCache, LinearState]


class Memory(NamedTuple):
    """A cross-attention source projected once: its cache and key mask (batch, time), None when
    every key is valid (or, for linear attention, when padding was already summed out)."""

    cache: Cache
    mask: Optional[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.cache[0].size(0)

    def select(self, rows: torch.Tensor) -> "Memory":
        """The memory of the sources ``rows`` (indices into the batch)."""
        mask = None if self.mask is None else self.mask.index_select(0, rows)
        return Memory(select_rows(self.cache, rows), mask)


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache object (all its tensors, all batch rows)."""
    return sum(t.numel() * t.element_size() for t in cache)


def concat_caches(caches: Sequence[Cache]) -> Cache:
    """Join caches of one hypothesis each (batch 1) into one batch, in order."""
    return type(caches[0])(*(torch.cat(parts) for parts in zip(*caches)))


def cache_row(cache: Cache, index: int) -> Cache:
    """The cache of batch row ``index`` (a view, batch 1)."""
    return type(cache)(*(t[index : index + 1] for t in cache))


def select_rows(cache: Cache, rows: torch.Tensor) -> Cache:
    """The cache of batch rows ``rows`` (indices, repeats allowed), copied."""
    return type(cache)(*(t.index_select(0, rows) for t in cache))


class GrowingCache:
    """The self-attention caches of many hypotheses, one tensor per field with room to grow.

    ``concat_caches`` and ``KVCache.extend`` copy the whole cache at every step, so a step costs
    memory traffic in proportion to the prefix. Here each tensor is allocated with spare room
    along its time axis (``GROWTH`` tokens at a time): a step writes its token in place
    (``extend``, which ``SoftmaxAttention.causal`` calls as it would on a cache) and attention
    reads a view of the filled part; beam pruning reorders the rows by index (``select``).
    """

    GROWTH = 32

    def __init__(self, cache: Union[KVCache, LatentCache]):
        self.kind = type(cache)
        self.length = 0
        self.tensors = [t.new_empty(self._shape(t, 0)) for t in cache]
        self.extend(cache)

    def _shape(self, t: torch.Tensor, needed: int) -> list[int]:
        shape = list(t.shape)
        shape[self.kind.time_dim] = needed + self.GROWTH
        return shape

    def extend(self, new: Union[KVCache, LatentCache]) -> Union[KVCache, LatentCache]:
        """Append the entries ``new`` of the next tokens; returns the cache so far (views)."""
        dim, end = self.kind.time_dim, self.length + new.length
        for i, (buffer, part) in enumerate(zip(self.tensors, new)):
            if buffer.size(dim) < end:
                grown = buffer.new_empty(self._shape(buffer, end))
                grown.narrow(dim, 0, self.length).copy_(buffer.narrow(dim, 0, self.length))
                self.tensors[i] = buffer = grown
            buffer.narrow(dim, self.length, new.length).copy_(part)
        self.length = end
        return self.view()

    def view(self) -> Union[KVCache, LatentCache]:
        return self.kind(*(t.narrow(self.kind.time_dim, 0, self.length) for t in self.tensors))

    def select(self, rows: torch.Tensor) -> None:
        """Keep the hypotheses ``rows`` (indices, repeats allowed), in that order; only the
        filled part is copied, into tensors with the same room."""
        dim, selected = self.kind.time_dim, []
        for t in self.tensors:
            out = t.new_empty((len(rows),) + t.shape[1:])
            torch.index_select(t.narrow(dim, 0, self.length), 0, rows,
                               out=out.narrow(dim, 0, self.length))
            selected.append(out)
        self.tensors = selected


def growing(cache: Cache) -> Union[GrowingCache, LinearState]:
    """A cache made to grow in place; linear attention's fixed-size state stays as it is."""
    return cache if cache.time_dim is None else GrowingCache(cache)


def select_hypotheses(
    cache: Union[GrowingCache, LinearState], rows: torch.Tensor
) -> Union[GrowingCache, LinearState]:
    """``cache`` of the hypotheses ``rows``: a growing cache in place, a state copied."""
    if isinstance(cache, GrowingCache):
        cache.select(rows)
        return cache
    return select_rows(cache, rows)


def key_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """ESPnet's (batch, 1, time) or a (batch, time) key mask as (batch, time) booleans."""
    if mask is None:
        return None
    if mask.dim() == 3 and mask.size(1) == 1:
        mask = mask.squeeze(1)
    if mask.dim() != 2:
        raise ValueError(
            "attention mask must mark valid keys, shaped (batch, time) or (batch, 1, time); "
            f"got shape {tuple(mask.shape)} (causality is the decoder's causal(), not a mask)"
        )
    return mask.bool()


def causal_mask(n_queries: int, start: int, device: torch.device) -> torch.Tensor:
    """(n_queries, start + n_queries) booleans: query i, at position start + i, sees keys <= it."""
    keys = torch.arange(start + n_queries, device=device)
    return keys <= start + torch.arange(n_queries, device=device)[:, None]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_int(name: str, value, minimum: int) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name} must be an integer >= {minimum}, got {value!r}",
    )


def _check_bool(name: str, value) -> None:
    _require(isinstance(value, bool), f"{name} must be true or false, got {value!r}")


def _head_dim(d_model: int, n_heads: int) -> int:
    _check_int("n_heads", n_heads, 1)
    _require(
        d_model % n_heads == 0, f"d_model ({d_model}) must be divisible by n_heads ({n_heads})"
    )
    return d_model // n_heads


class Attention(nn.Module, ABC):
    """The interface every variant implements (see the module docstring)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float,
        rotary_dim: int,
        rotary_freq_dim: Optional[int] = None,
    ):
        super().__init__()
        _require(0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = _head_dim(d_model, n_heads)
        self.dropout = dropout
        self.rotary = RotaryEmbedding(rotary_dim, freq_dim=rotary_freq_dim) if rotary_dim else None

    def _rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return x if self.rotary is None else self.rotary(x, start)

    @staticmethod
    def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """(batch, time, n_heads * d) -> (batch, n_heads, time, d)."""
        return x.view(x.size(0), x.size(1), n_heads, -1).transpose(1, 2)

    @staticmethod
    def _merge_heads(x: torch.Tensor) -> torch.Tensor:
        """(batch, heads, time, d) -> (batch, time, heads * d)."""
        return x.transpose(1, 2).reshape(x.size(0), x.size(2), -1)

    @abstractmethod
    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Non-causal self-attention of ``x`` (batch, time, d_model) over its valid keys."""

    @abstractmethod
    def causal(
        self, x: torch.Tensor, cache: Optional[Cache] = None, start: int = 0
    ) -> tuple[torch.Tensor, Cache]:
        """Causal self-attention of tokens ``x`` (batch, time, d_model) at positions ``start``,
        ``start + 1``, ... over ``cache`` (the tokens before ``start``) and themselves.

        Returns the output and the cache extended by ``x``.
        """

    @abstractmethod
    def _memory(self, source: torch.Tensor, mask: Optional[torch.Tensor]) -> Memory:
        """Project a source for cross-attention (``mask`` as (batch, time) or None)."""

    @abstractmethod
    def _attend(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Cross-attention of ``x`` to a memory of the same batch size."""

    @abstractmethod
    def cache_bytes(self, num_tokens: int, dtype: torch.dtype = torch.float32) -> int:
        """Analytic size of this variant's cache of ``num_tokens`` tokens, one sequence."""

    def memory(self, source: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Memory:
        """Project ``source`` (batch, time, d_model), e.g. an encoder output, once for
        cross-attention; ``mask`` marks its valid frames."""
        _require(
            self.rotary is None,
            "cross-attention has no position shared by queries and source: "
            "build it with rotary=False",
        )
        return self._memory(source, key_mask(mask))

    def attend(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Cross-attention of ``x`` (batch, time, d_model) to ``memory``.

        A memory of ``sources`` rows serves any multiple of that many query rows, utterance-major
        (a beam's hypotheses share their utterance's row): each source's rows are folded into
        one, so a source is read once for all its hypotheses.
        """
        sources = memory.batch_size
        if x.size(0) != sources:
            _require(
                x.size(0) % sources == 0,
                f"{x.size(0)} query rows cannot share a memory of {sources} sources",
            )
            return self._attend(x.reshape(sources, -1, x.size(-1)), memory).view_as(x)
        return self._attend(x, memory)


class SoftmaxAttention(Attention):
    """Softmax attention over per-token cache entries; subclasses say how tokens become queries
    and entries, and how queries read entries."""

    @abstractmethod
    def _queries(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """(batch, n_heads, time, query_dim), rotated for positions ``start``, ..."""

    @abstractmethod
    def _entries(self, x: torch.Tensor, start: int) -> Union[KVCache, LatentCache]:
        """What is cached for tokens ``x`` at positions ``start``, ..."""

    @abstractmethod
    def _read(
        self, q: torch.Tensor, cache: Union[KVCache, LatentCache], mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Attention output (batch, time, d_model); ``mask`` broadcasts to (batch, heads,
        queries, keys), True = may attend."""

    @property
    @abstractmethod
    def entry_width(self) -> int:
        """Numbers cached per token."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        keys = key_mask(mask)
        return self._read(
            self._queries(x, 0), self._entries(x, 0), None if keys is None else keys[:, None, None]
        )

    def causal(
        self, x: torch.Tensor, cache: Optional[Union[KVCache, LatentCache]] = None, start: int = 0
    ) -> tuple[torch.Tensor, Union[KVCache, LatentCache]]:
        cached = 0 if cache is None else cache.length
        _require(start == cached, f"start ({start}) must equal the cached length ({cached})")
        new = self._entries(x, start)
        cache = new if cache is None else cache.extend(new)
        mask = None if x.size(1) == 1 else causal_mask(x.size(1), start, x.device)
        return self._read(self._queries(x, start), cache, mask), cache

    def _memory(self, source: torch.Tensor, mask: Optional[torch.Tensor]) -> Memory:
        return Memory(self._entries(source, 0), mask)

    def _attend(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        mask = None if memory.mask is None else memory.mask[:, None, None]
        return self._read(self._queries(x, 0), memory.cache, mask)

    def cache_bytes(self, num_tokens: int, dtype: torch.dtype = torch.float32) -> int:
        return num_tokens * self.entry_width * dtype.itemsize

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0


class GroupedQueryAttention(SoftmaxAttention):
    """GQA (Ainslie et al. 2023): ``n_kv_heads`` key/value heads, each shared by
    ``n_heads / n_kv_heads`` query heads; MQA when 1, MHA when ``n_heads``.

    Projections keep ESPnet's names and biases (linear_q/k/v/out), so stock MHA weights load.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        *,
        n_kv_heads: int,
        rotary: bool = True,
    ):
        _check_bool("rotary", rotary)
        super().__init__(d_model, n_heads, dropout, _head_dim(d_model, n_heads) if rotary else 0)
        _check_int("n_kv_heads", n_kv_heads, 1)
        _require(
            n_heads % n_kv_heads == 0,
            f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})",
        )
        self.n_kv_heads = n_kv_heads
        kv_dim = n_kv_heads * self.head_dim
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, kv_dim)
        self.linear_v = nn.Linear(d_model, kv_dim)
        self.linear_out = nn.Linear(d_model, d_model)

    @property
    def entry_width(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim

    def _queries(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return self._rotate(self._split_heads(self.linear_q(x), self.n_heads), start)

    def _entries(self, x: torch.Tensor, start: int) -> KVCache:
        key = self._rotate(self._split_heads(self.linear_k(x), self.n_kv_heads), start)
        return KVCache(key, self._split_heads(self.linear_v(x), self.n_kv_heads))

    def _read(
        self, q: torch.Tensor, cache: KVCache, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q,
            cache.key,
            cache.value,
            attn_mask=mask,
            dropout_p=self._dropout_p(),
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.linear_out(self._merge_heads(out))


class MultiHeadAttention(GroupedQueryAttention):
    """Standard multi-head attention: GQA with one key/value head per query head."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *, rotary: bool = True):
        super().__init__(d_model, n_heads, dropout, n_kv_heads=n_heads, rotary=rotary)


class MultiHeadLatentAttention(SoftmaxAttention):
    """MLA (DeepSeek-V2/V3): keys and values of all heads come from one latent per token.

    ``c = RMSNorm(W_dkv h)`` (``kv_latent_dim``) is up-projected to per-head content keys
    (``nope_dim``) and values (``head_dim``) (``kv_up`` = [W_uk; W_uv]). Position lives in
    ``rope_dim`` decoupled dims: a rotated query part per head and a rotated key shared by all
    heads (by each group of ``n_heads / rope_key_heads`` heads). The cache holds ``c`` and those
    keys only. In eval mode with ``absorb`` the up-projections are absorbed: W_uk turns the query
    into a latent query and W_uv maps the latent context to values, so attention reads the cached
    latent directly instead of up-projecting the whole cache at every step. ``q_latent_dim`` > 0
    also compresses the query through a normalised latent.

    Defaults follow DeepSeek-V2: ``kv_latent_dim = 4 * head_dim``, ``rope_dim = head_dim / 2``
    (0 without rotary: the decoupled key exists to carry position), ``nope_dim = head_dim``, one
    rotary key, a normalised latent, no biases. What an MHA converted to MLA needs (MHA2MLA,
    ``espnet_plugin.convert_attention``): ``latent_norm: false`` (a normalised latent cannot hold
    an SVD factor), ``bias: true`` (MHA's query, key and output biases), ``nope_dim = head_dim -
    rope_dim`` (the head's channels that stopped rotating), ``rope_key_heads`` up to ``n_heads``,
    and ``rope_head_dim``: the rotary dims turn at the frequencies of a RoPE over that many
    channels, the pairs kept saved as the rotary module's ``pairs`` buffer.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        *,
        kv_latent_dim: Optional[int] = None,
        rope_dim: Optional[int] = None,
        q_latent_dim: int = 0,
        absorb: bool = True,
        rotary: bool = True,
        nope_dim: Optional[int] = None,
        rope_key_heads: int = 1,
        rope_head_dim: Optional[int] = None,
        latent_norm: bool = True,
        bias: bool = False,
    ):
        head_dim = _head_dim(d_model, n_heads)
        for name, value in (("rotary", rotary), ("absorb", absorb), ("latent_norm", latent_norm),
                            ("bias", bias)):
            _check_bool(name, value)
        kv_latent_dim = 4 * head_dim if kv_latent_dim is None else kv_latent_dim
        nope_dim = head_dim if nope_dim is None else nope_dim
        if rope_dim is None:
            rope_dim = head_dim // 2 if rotary else 0
        _check_int("kv_latent_dim", kv_latent_dim, 1)
        _check_int("q_latent_dim", q_latent_dim, 0)
        _check_int("nope_dim", nope_dim, 0)
        _check_int("rope_key_heads", rope_key_heads, 1)
        _require(n_heads % rope_key_heads == 0,
                 f"rope_key_heads ({rope_key_heads}) must divide n_heads ({n_heads})")
        if rotary:
            _require(
                isinstance(rope_dim, int) and rope_dim > 0 and rope_dim % 2 == 0,
                f"rope_dim must be a positive even integer with rotary=True, got {rope_dim!r}",
            )
        else:
            _require(rope_dim == 0, f"rope_dim must be 0 with rotary=False, got {rope_dim!r}")
            _require(rope_head_dim is None, "rope_head_dim needs rotary=True")
        _require(nope_dim + rope_dim > 0, "nope_dim + rope_dim must be positive")
        super().__init__(d_model, n_heads, dropout, rotary_dim=rope_dim,
                         rotary_freq_dim=rope_head_dim)
        self.kv_latent_dim = kv_latent_dim
        self.rope_dim = rope_dim
        self.nope_dim = nope_dim
        self.rope_key_heads = rope_key_heads
        self.absorb = absorb
        query_dim = n_heads * (nope_dim + rope_dim)
        if q_latent_dim:
            self.query = nn.Sequential(
                nn.Linear(d_model, q_latent_dim, bias=False),
                nn.RMSNorm(q_latent_dim, eps=1e-6),
                nn.Linear(q_latent_dim, query_dim, bias=bias),
            )
        else:
            self.query = nn.Linear(d_model, query_dim, bias=bias)
        self.kv_down = nn.Linear(d_model, kv_latent_dim + rope_key_heads * rope_dim, bias=bias)
        self.kv_norm = nn.RMSNorm(kv_latent_dim, eps=1e-6) if latent_norm else None
        self.kv_up = nn.Linear(kv_latent_dim, n_heads * (nope_dim + self.head_dim), bias=False)
        self.linear_out = nn.Linear(d_model, d_model, bias=bias)

    @property
    def entry_width(self) -> int:
        return self.kv_latent_dim + self.rope_key_heads * self.rope_dim

    @property
    def _absorbing(self) -> bool:
        return self.absorb and not self.training

    def _queries(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Per head the content query (``nope_dim``; absorbed: already times W_uk, so
        ``kv_latent_dim``) and the rotated position query (``rope_dim``)."""
        if self._absorbing:
            weight, bias = self._absorbed()["query"]
            head = x if isinstance(self.query, nn.Linear) else self.query[:-1](x)
            q = self._split_heads(F.linear(head, weight, bias), self.n_heads)
            content_dim = self.kv_latent_dim
        else:
            q = self._split_heads(self.query(x), self.n_heads)
            content_dim = self.nope_dim
        content, position = q.split([content_dim, self.rope_dim], dim=-1)
        return torch.cat((content, self._rotate(position, start)), dim=-1)

    def _absorbed(self) -> dict:
        """The query projection with W_uk folded into its content rows, and the output
        projection with W_uv folded in (DeepSeek's inference form), so that attention reads the
        latent with no per-head up-projection at all. Computed once per set of weights (kept
        while they do not change, and only where no gradient is recorded)."""
        projection = self.query if isinstance(self.query, nn.Linear) else self.query[-1]
        sources = (projection.weight, projection.bias, self.kv_up.weight, self.linear_out.weight)
        key = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in sources
                    if t is not None)
        cached = getattr(self, "_absorbed_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.inference_mode(False):  # kept beyond decoding: not inference tensors
            heads, width = self.n_heads, self.nope_dim + self.rope_dim
            w_uk, w_uv = self.kv_up.weight.view(heads, self.nope_dim + self.head_dim, -1).split(
                [self.nope_dim, self.head_dim], dim=1)
            w_q = projection.weight.view(heads, width, -1)
            query = torch.cat((w_uk.mT @ w_q[:, :self.nope_dim], w_q[:, self.nope_dim:]), 1)
            query_bias = None
            if projection.bias is not None:
                b_q = projection.bias.view(heads, width, 1)
                query_bias = torch.cat((w_uk.mT @ b_q[:, :self.nope_dim],
                                        b_q[:, self.nope_dim:]), 1)
                query_bias = query_bias.reshape(-1)
            w_out = self.linear_out.weight.view(-1, heads, self.head_dim)
            out = torch.einsum("dhv,hvl->dhl", w_out, w_uv).reshape(w_out.size(0), -1)
            folded = {"query": (query.reshape(-1, query.size(-1)), query_bias),
                      "out": (out, self.linear_out.bias)}
        if not torch.is_grad_enabled():
            self._absorbed_cache = (key, folded)
        return folded

    def _entries(self, x: torch.Tensor, start: int) -> LatentCache:
        rope_width = self.rope_key_heads * self.rope_dim
        latent, rope_key = self.kv_down(x).split([self.kv_latent_dim, rope_width], dim=-1)
        if self.rope_dim:  # each rotary key turns on its own
            rope_key = self._rotate(self._split_heads(rope_key, self.rope_key_heads), start)
            rope_key = self._merge_heads(rope_key)
        else:  # an empty view of the whole projection would keep it alive as long as the cache
            rope_key = rope_key.clone()
        if self.kv_norm is not None:
            latent = self.kv_norm(latent)
        return LatentCache(latent, rope_key)

    def _rope_keys(self, cache: LatentCache) -> torch.Tensor:
        """The rotary key each query head reads, (batch, n_heads, time, rope_dim) (a view)."""
        # (batch, rope_key_heads, time, rope_dim), each key repeated for its group of heads
        keys = self._split_heads(cache.rope_key, self.rope_key_heads)
        group = self.n_heads // self.rope_key_heads
        batch, _, time, _ = keys.shape
        return keys[:, :, None].expand(-1, -1, group, -1, -1).reshape(
            batch, self.n_heads, time, self.rope_dim
        )

    def _read(
        self, q: torch.Tensor, cache: LatentCache, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        if self._absorbing:
            weight, bias = self._absorbed()["out"]
            return F.linear(self._merge_heads(self._read_absorbed(q, cache, mask)), weight, bias)
        return self.linear_out(self._merge_heads(self._read_naive(q, cache, mask)))

    def _read_naive(
        self, q: torch.Tensor, cache: LatentCache, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Up-project every cached latent to per-head keys and values, then attend."""
        up = self._split_heads(self.kv_up(cache.latent), self.n_heads)
        key, value = up.split([self.nope_dim, self.head_dim], dim=-1)
        key = torch.cat((key, self._rope_keys(cache)), dim=-1)
        return F.scaled_dot_product_attention(
            q, key, value, attn_mask=mask, dropout_p=self._dropout_p()
        )

    def _read_absorbed(
        self, q: torch.Tensor, cache: LatentCache, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Attend against the latent with queries already times W_uk: q.W_uk c = (W_uk^T q).c,
        and the latent context per head (W_uv is folded into the output projection). The heads
        join the queries, so each product is one plain batched one over the shared latent and
        rotary keys (a broadcast operand would be copied out to the full batch)."""
        batch, heads, n_queries, _ = q.shape
        content, position = q.split([self.kv_latent_dim, self.rope_dim], dim=-1)
        scores = torch.bmm(content.reshape(batch, heads * n_queries, -1), cache.latent.mT)
        scores = scores.view(batch, heads, n_queries, -1)
        if self.rope_dim:
            rope_keys = self._split_heads(cache.rope_key, self.rope_key_heads)
            grouped = position.reshape(batch, self.rope_key_heads, -1, self.rope_dim)
            scores = scores + (grouped @ rope_keys.mT).view_as(scores)
        scores = scores / math.sqrt(self.nope_dim + self.rope_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        context = torch.bmm(scores.softmax(dim=-1).view(batch, heads * n_queries, -1),
                            cache.latent)
        return context.view(batch, heads, n_queries, -1)


class LinearAttention(Attention):
    """Linear attention with the elu + 1 feature map (Katharopoulos et al. 2020).

    softmax(q.k) is replaced by phi(q).phi(k), so attention to a set of keys only needs
    sum phi(k) v^T and sum phi(k): O(time) without a cache, and a decoder's cache is these two
    running sums, fixed in size. Rotary position rotates phi(q) and phi(k) in the numerator only
    (RoFormer, Su et al. 2021, sec. 3.4.4), keeping the normaliser positive. A whole causal
    sequence (training) uses the equivalent masked quadratic form, which needs no
    (time, head_dim, head_dim) tensor. There is no attention matrix to drop out: ``dropout``
    applies to the context.
    """

    eps = 1e-6

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *, rotary: bool = True):
        _check_bool("rotary", rotary)
        super().__init__(d_model, n_heads, dropout, _head_dim(d_model, n_heads) if rotary else 0)
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self._split_heads(self.linear_q(x), self.n_heads)) + 1

    def _keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = F.elu(self._split_heads(self.linear_k(x), self.n_heads)) + 1
        return key, self._split_heads(self.linear_v(x), self.n_heads)

    def _summarise(self, key: torch.Tensor, value: torch.Tensor, start: int) -> LinearState:
        return LinearState(self._rotate(key, start).mT @ value, key.sum(dim=2))

    def _output(self, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        context = self._merge_heads(numerator / (denominator + self.eps))
        return self.linear_out(F.dropout(context, self.dropout, self.training))

    def _read(self, q: torch.Tensor, state: LinearState, start: int) -> torch.Tensor:
        return self._output(self._rotate(q, start) @ state.kv, q @ state.k_sum[..., None])

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        key, value = self._keys_values(x)
        keys = key_mask(mask)
        if keys is not None:
            key = key * keys[:, None, :, None]
        return self._read(self._queries(x), self._summarise(key, value, 0), 0)

    def causal(
        self, x: torch.Tensor, cache: Optional[LinearState] = None, start: int = 0
    ) -> tuple[torch.Tensor, LinearState]:
        q, (key, value) = self._queries(x), self._keys_values(x)
        q_rot, key_rot = self._rotate(q, start), self._rotate(key, start)
        within = causal_mask(x.size(1), 0, x.device)
        numerator = (q_rot @ key_rot.mT).masked_fill(~within, 0.0) @ value
        denominator = (q @ key.mT).masked_fill(~within, 0.0).sum(dim=-1, keepdim=True)
        state = LinearState(key_rot.mT @ value, key.sum(dim=2))
        if cache is not None:
            numerator = numerator + q_rot @ cache.kv
            denominator = denominator + q @ cache.k_sum[..., None]
            state = LinearState(cache.kv + state.kv, cache.k_sum + state.k_sum)
        return self._output(numerator, denominator), state

    def _memory(self, source: torch.Tensor, mask: Optional[torch.Tensor]) -> Memory:
        key, value = self._keys_values(source)
        if mask is not None:
            key = key * mask[:, None, :, None]
        return Memory(self._summarise(key, value, 0), None)

    def _attend(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        return self._read(self._queries(x), memory.cache, 0)

    def cache_bytes(self, num_tokens: int, dtype: torch.dtype = torch.float32) -> int:
        return self.n_heads * (self.head_dim + 1) * self.head_dim * dtype.itemsize


ATTENTION_TYPES: dict[str, type[Attention]] = {
    "mha": MultiHeadAttention,
    "gqa": GroupedQueryAttention,
    "mla": MultiHeadLatentAttention,
    "linear": LinearAttention,
}


def attention_options(attention_type: str) -> dict[str, inspect.Parameter]:
    """The options ``build_attention`` accepts for a type (the class's keyword-only arguments)."""
    parameters = inspect.signature(ATTENTION_TYPES[attention_type]).parameters.values()
    return {p.name: p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_attention(
    attention_type: str, d_model: int, n_heads: int, dropout: float = 0.0, **options
) -> Attention:
    """Make an attention variant from its YAML name (``attention_type``) and options
    (``attention_conf``); an unknown type or option, a missing required option or a bad value
    raises a ValueError that names it and what is allowed."""
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(
            f"unknown attention_type {attention_type!r}; allowed: {', '.join(ATTENTION_TYPES)}"
        )
    allowed = attention_options(attention_type)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for attention_type {attention_type!r}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    missing = [n for n, p in allowed.items() if p.default is p.empty and n not in options]
    if missing:
        raise ValueError(
            f"attention_type {attention_type!r} needs option(s) {', '.join(missing)}"
        )
    return ATTENTION_TYPES[attention_type](d_model, n_heads, dropout, **options)
