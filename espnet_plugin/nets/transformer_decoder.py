"""Transformer decoder whose beam-search state is a real KV cache.

ESPnet's ``TransformerDecoder`` keeps each layer's outputs as its state: every beam step re-embeds
the whole prefix, re-projects its keys and values, and re-projects the whole encoder output for
every hypothesis. This decoder keeps per layer what attention reads: the self-attention cache of
the chosen variant (K/V, MLA latent or linear state) grows by one token per step, and the
cross-attention memory (K/V or latent of the encoder output) is projected once per utterance in
``init_state`` and shared by all hypotheses. A step then costs one token's projections.

With MHA and absolute positions, the parameter names are ESPnet's, so a stock decoder's
state_dict loads as is and gives the same scores.
"""

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import torch
from espnet2.asr.decoder.abs_decoder import AbsDecoder
from torch import nn
from typeguard import typechecked

from espnet_plugin.compat import (
    BatchScorerInterface,
    LayerNorm,
    PositionalEncoding,
    PositionwiseFeedForward,
    make_pad_mask,
)
from espnet_plugin.nets.attention import (
    Attention,
    Cache,
    GrowingCache,
    LinearState,
    Memory,
    build_attention,
    cache_row,
    concat_caches,
    growing,
    select_hypotheses,
)

POSITIONS = ("absolute", "rotary")
# ESPnet's stock TransformerDecoder options that the cached decoder shares, and those it lacks
# (with the one value of each that it matches).
STOCK_DECODER_SHARED = ("attention_heads", "linear_units", "num_blocks", "dropout_rate",
                        "positional_dropout_rate", "self_attention_dropout_rate",
                        "src_attention_dropout_rate", "input_layer", "use_output_layer",
                        "normalize_before", "concat_after")
STOCK_DECODER_UNSUPPORTED = {"layer_drop_rate": 0.0, "qk_norm": False}


def cached_decoder_conf(stock_conf: dict) -> dict:
    """The ``decoder_conf`` of a cached decoder equal to ESPnet's stock ``TransformerDecoder``
    of ``stock_conf``: MHA, absolute positions, the same weights under the same names."""
    for key, neutral in STOCK_DECODER_UNSUPPORTED.items():
        if stock_conf.get(key, neutral) != neutral:
            raise ValueError(f"decoder_conf {key}: {stock_conf[key]} has no counterpart in the "
                             f"cached decoder; only {neutral} converts")
    return {**{k: stock_conf[k] for k in STOCK_DECODER_SHARED if k in stock_conf},
            "position": "absolute"}


class OffsetPositionalEncoding(PositionalEncoding):
    """ESPnet's scaled sinusoidal encoding, applied from any position: a decoding step embeds
    only its new token, at position ``start``."""

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        self.extend_pe(x.new_empty(1, start + x.size(1)))
        return self.dropout(x * self.xscale + self.pe[:, start : start + x.size(1)])


@dataclass(frozen=True)
class DecoderState:
    """A hypothesis' decoder state: its self-attention cache per layer (None before the first
    step) and the utterance's cross-attention memory per layer, one object for all hypotheses.

    Not a tuple: ESPnet 202611's beam search rebuilds every tuple of a finished hypothesis' state
    as ``type(t)(generator)``, which a NamedTuple refuses."""

    caches: Optional[Tuple[Cache, ...]]
    memories: Tuple[Memory, ...]


class BeamState:
    """The decoder state of every hypothesis of a batch of utterances, for batched beam search:
    per layer one self-attention cache whose row n is hypothesis n (a ``GrowingCache``, or linear
    attention's state; None before the first step) and the cross-attention memories, one row
    per utterance, its hypotheses utterance-major in between."""

    def __init__(self, memories: Tuple[Memory, ...]):
        self.memories = memories
        self.caches: List[Optional[Union[GrowingCache, LinearState]]] = [None] * len(memories)
        self.length = 0

    def select(self, rows: torch.Tensor, utterances: Optional[torch.Tensor] = None) -> None:
        """Keep the hypotheses ``rows`` (beam pruning), and the utterances ``utterances`` when
        some leave the batch."""
        if self.length:
            self.caches = [select_hypotheses(cache, rows) for cache in self.caches]
        if utterances is not None:
            self.memories = tuple(memory.select(utterances) for memory in self.memories)


class DecoderLayer(nn.Module):
    """Self-attention, cross-attention and feed-forward sublayers with residuals, pre- or
    post-norm, under ESPnet's ``DecoderLayer`` parameter names."""

    def __init__(
        self,
        size: int,
        self_attn: Attention,
        src_attn: Attention,
        feed_forward: nn.Module,
        dropout_rate: float,
        normalize_before: bool,
        concat_after: bool,
    ):
        super().__init__()
        self.self_attn = self_attn
        self.src_attn = src_attn
        self.feed_forward = feed_forward
        self.norm1 = LayerNorm(size)
        self.norm2 = LayerNorm(size)
        self.norm3 = LayerNorm(size)
        self.dropout = nn.Dropout(dropout_rate)
        self.normalize_before = normalize_before
        # concat_after: x + linear([input; attention]) instead of x + attention.
        self.concat_linear1 = nn.Linear(2 * size, size) if concat_after else None
        self.concat_linear2 = nn.Linear(2 * size, size) if concat_after else None

    def forward(
        self, x: torch.Tensor, memory: Memory, cache: Optional[Cache] = None, start: int = 0
    ) -> Tuple[torch.Tensor, Cache]:
        """Tokens ``x`` (batch, time, size) at positions ``start``, ... after ``cache``; returns
        the output and the self-attention cache extended by them."""
        h = self._sublayer_input(x, self.norm1)
        attention, cache = self.self_attn.causal(h, cache, start)
        x = self._sublayer_output(x, h, attention, self.norm1, self.concat_linear1)
        h = self._sublayer_input(x, self.norm2)
        x = self._sublayer_output(
            x, h, self.src_attn.attend(h, memory), self.norm2, self.concat_linear2
        )
        h = self._sublayer_input(x, self.norm3)
        return self._sublayer_output(x, h, self.feed_forward(h), self.norm3, None), cache

    def _sublayer_input(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return norm(x) if self.normalize_before else x

    def _sublayer_output(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        out: torch.Tensor,
        norm: nn.Module,
        concat_linear: Optional[nn.Linear],
    ) -> torch.Tensor:
        if concat_linear is None:
            x = x + self.dropout(out)
        else:
            x = x + concat_linear(torch.cat((h, out), dim=-1))
        return x if self.normalize_before else norm(x)


class CachedTransformerDecoder(AbsDecoder, BatchScorerInterface):
    """Attention decoder for ESPnet2 ASR with a per-layer KV cache for beam search.

    Arguments up to ``concat_after`` are those of ESPnet's ``TransformerDecoder``. Added:

    Args:
        position: "absolute" (ESPnet's sinusoidal encoding added to the embeddings) or
            "rotary" (RoPE in self-attention; the embeddings carry no position).
        self_attention_type, self_attention_conf: self-attention variant and its options
            (``espnet_plugin.nets.attention.build_attention``); ``rotary`` follows ``position``.
        src_attention_type, src_attention_conf: cross-attention variant and its options,
            chosen independently; cross-attention never rotates.

    Beam search: ``init_state`` projects the utterance once, ``batch_score`` returns one
    ``DecoderState`` per hypothesis, so ScorerInterface's ``select_state`` (pick the i-th)
    serves as is.
    """

    @typechecked
    def __init__(
        self,
        vocab_size: int,
        encoder_output_size: int,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        self_attention_dropout_rate: float = 0.0,
        src_attention_dropout_rate: float = 0.0,
        input_layer: str = "embed",
        use_output_layer: bool = True,
        normalize_before: bool = True,
        concat_after: bool = False,
        position: str = "absolute",
        self_attention_type: str = "mha",
        self_attention_conf: Optional[dict] = None,
        src_attention_type: str = "mha",
        src_attention_conf: Optional[dict] = None,
    ):
        super().__init__()
        if input_layer != "embed":
            raise ValueError(f"input_layer must be 'embed' (token ids in), got {input_layer!r}")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
        self_attention_conf = dict(self_attention_conf or {})
        src_attention_conf = dict(src_attention_conf or {})
        for name, conf in (("self", self_attention_conf), ("src", src_attention_conf)):
            if "rotary" in conf:
                raise ValueError(
                    f"{name}_attention_conf must not set rotary: the decoder's position option "
                    "decides it for self-attention, and cross-attention never rotates"
                )
        size = encoder_output_size
        self.position = position
        self.embed = nn.Sequential(
            nn.Embedding(vocab_size, size),
            OffsetPositionalEncoding(size, positional_dropout_rate)
            if position == "absolute"
            else nn.Dropout(positional_dropout_rate),
        )
        self.decoders = nn.ModuleList(
            DecoderLayer(
                size,
                build_attention(
                    self_attention_type,
                    size,
                    attention_heads,
                    self_attention_dropout_rate,
                    rotary=position == "rotary",
                    **self_attention_conf,
                ),
                build_attention(
                    src_attention_type,
                    size,
                    attention_heads,
                    src_attention_dropout_rate,
                    rotary=False,
                    **src_attention_conf,
                ),
                PositionwiseFeedForward(size, linear_units, dropout_rate),
                dropout_rate,
                normalize_before,
                concat_after,
            )
            for _ in range(num_blocks)
        )
        self.after_norm = LayerNorm(size) if normalize_before else None
        self.output_layer = nn.Linear(size, vocab_size) if use_output_layer else None

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        token_embedding, position = self.embed
        x = token_embedding(tokens)
        return position(x, start) if self.position == "absolute" else position(x)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.after_norm is None else self.after_norm(x)

    def forward(
        self,
        hs_pad: torch.Tensor,
        hlens: torch.Tensor,
        ys_in_pad: torch.Tensor,
        ys_in_lens: torch.Tensor,
        return_hs: bool = False,
        return_all_hs: bool = False,
    ) -> Tuple[Any, torch.Tensor]:
        """Teacher-forced decoding (training), as ESPnet's ``TransformerDecoder.forward``.

        Args:
            hs_pad: encoder output (batch, frames, size); hlens: its lengths (batch,).
            ys_in_pad: input token ids (batch, tokens); ys_in_lens: their lengths (batch,).
            return_hs: also return the last hidden states (before the output layer).
            return_all_hs: also return every layer's output.

        Returns:
            Logits (batch, tokens, vocab) (or hidden states without output layer), paired
            with the hidden states when asked, and the output lengths (batch,).
        """
        valid_frames = ~make_pad_mask(hlens, maxlen=hs_pad.size(1)).to(hs_pad.device)
        x = self._embed(ys_in_pad, 0)
        layer_outputs = []
        for layer in self.decoders:
            # Causality alone keeps real tokens off the padding, which only follows them.
            x, _ = layer(x, layer.src_attn.memory(hs_pad, valid_frames))
            layer_outputs.append(x)
        hidden = self._final_norm(x)
        logits = hidden if self.output_layer is None else self.output_layer(hidden)
        if return_hs:
            return (logits, hidden), ys_in_lens
        if return_all_hs:
            return (logits, layer_outputs), ys_in_lens
        return logits, ys_in_lens

    def _memories(self, xs: torch.Tensor, lengths: Optional[torch.Tensor]) -> Tuple[Memory, ...]:
        """Every layer's cross-attention memory of encoder outputs ``xs`` (utterances, frames,
        size), padded frames beyond ``lengths`` masked out."""
        valid = None
        if lengths is not None and bool((lengths < xs.size(1)).any()):
            valid = ~make_pad_mask(lengths, maxlen=xs.size(1)).to(xs.device)
        return tuple(layer.src_attn.memory(xs, valid) for layer in self.decoders)

    def init_state(self, x: torch.Tensor) -> DecoderState:
        """Project the utterance's encoder output ``x`` (frames, size) into every layer's
        cross-attention memory, once; BatchBeamSearch calls this before the first step."""
        return DecoderState(None, self._memories(x[None], None))

    def batch_init_state(
        self, x: torch.Tensor, xs_lengths: Optional[torch.Tensor] = None
    ) -> DecoderState:
        """``init_state`` of one utterance (frames, size), or of a padded batch of them
        (utterances, frames, size) with their ``xs_lengths``, as ESPnet 202611's beam search
        decodes with ``--batch_size``: one state whose memory rows are the utterances."""
        if x.dim() == 2:
            return self.init_state(x)
        return DecoderState(None, self._memories(x, xs_lengths))

    def start_beams(self, xs: torch.Tensor, lengths: torch.Tensor) -> BeamState:
        """The state of batched beam search over encoder outputs ``xs`` (utterances, frames,
        size) of ``lengths``: their memories, projected once."""
        return BeamState(self._memories(xs, lengths))

    def step_beams(self, tokens: torch.Tensor, state: BeamState) -> torch.Tensor:
        """Next-token log-probabilities (hypotheses, vocab) after the tokens ``tokens``
        (hypotheses, new tokens) that follow those of ``state``, which grows by them in place."""
        start = state.length
        x = self._embed(tokens, start)
        for i, (layer, memory) in enumerate(zip(self.decoders, state.memories)):
            x, cache = layer(x, memory, state.caches[i], start)
            if not isinstance(state.caches[i], GrowingCache):  # a first step, or a linear state
                state.caches[i] = growing(cache)
        state.length = start + tokens.size(1)
        hidden = self._final_norm(x[:, -1])
        return hidden if self.output_layer is None else self.output_layer(hidden).log_softmax(-1)

    def score(
        self, ys: torch.Tensor, state: DecoderState, x: torch.Tensor
    ) -> Tuple[torch.Tensor, DecoderState]:
        """Next-token log-probabilities (vocab,) of one prefix ``ys`` and its new state."""
        logp, states = self.batch_score(ys[None], [state], x[None])
        return logp[0], states[0]

    def batch_score(
        self,
        ys: torch.Tensor,
        states: List[DecoderState],
        xs: torch.Tensor,
        return_hs: bool = False,
        xs_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[Any, List[DecoderState]]:
        """Next-token log-probabilities (hypotheses, vocab) of the prefixes ``ys``
        (hypotheses, length).

        Only the tokens not in the caches are run: the last one at each step, the whole prefix
        on the first step (a primer may hold several tokens). ``xs`` and ``xs_mask`` are not
        read: the encoder output was projected, its padding masked, by ``batch_init_state``.
        Returns one state per hypothesis (views into this step's batched caches), with the
        next-token scores and, with ``return_hs``, the hidden states.
        """
        memories = states[0].memories
        if any(state.memories is not memories for state in states):
            raise ValueError(
                "batch_score got hypotheses of different decodes; a state belongs to the "
                "utterances given to init_state or batch_init_state"
            )
        n_layers = len(self.decoders)
        if states[0].caches is None:
            start, caches = 0, [None] * n_layers
        else:
            start = ys.size(1) - 1
            caches = [concat_caches([s.caches[i] for s in states]) for i in range(n_layers)]
        x = self._embed(ys[:, start:], start)
        new_caches = []
        for layer, cache, memory in zip(self.decoders, caches, memories):
            x, cache = layer(x, memory, cache, start)
            new_caches.append(cache)
        hidden = self._final_norm(x[:, -1])
        logp = hidden if self.output_layer is None else self.output_layer(hidden).log_softmax(-1)
        states = [
            DecoderState(tuple(cache_row(cache, b) for cache in new_caches), memories)
            for b in range(ys.size(0))
        ]
        return ((logp, hidden) if return_hs else logp), states


def cached_from_stock(
    stock: AbsDecoder, stock_conf: dict, vocab_size: int, encoder_output_size: int
) -> CachedTransformerDecoder:
    """The cached decoder computing what the stock ``TransformerDecoder`` ``stock`` (built
    from ``stock_conf``) computes, its weights loaded strictly, in the same mode and place."""
    parameter = next(stock.parameters())
    cached = CachedTransformerDecoder(
        vocab_size, encoder_output_size, **cached_decoder_conf(stock_conf)
    ).to(device=parameter.device, dtype=parameter.dtype)
    cached.load_state_dict(stock.state_dict())
    return cached.train(stock.training)
