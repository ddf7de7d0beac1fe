"""The plugin's ESPnet2 encoders: one stack (front end, blocks, final norm, intermediate CTC,
optional H-Net dynamic chunking), with the block shape and the sequence mixer chosen by each
registered subclass.

``encoder: conmamba``  Conformer layers with bidirectional Mamba as the mixer;
``encoder: conformer_x``  Conformer layers with any attention type (MHA, GQA, MLA, linear);
``encoder: branchformer_x``  Branchformer layers with any attention type.
"""

from typing import NamedTuple, Optional, Sequence

import torch
from espnet2.asr.encoder.abs_encoder import AbsEncoder
from torch import nn

from espnet_plugin.compat import (
    Conv2dSubsampling,
    Conv2dSubsampling2,
    Conv2dSubsampling6,
    Conv2dSubsampling8,
    TooShortUttError,
    check_short_utt,
    make_pad_mask,
)
from espnet_plugin.nets.attention import build_attention
from espnet_plugin.nets.blocks import BranchformerBlock, MacaronBlock
from espnet_plugin.nets.dynamic_chunking import DynamicChunking, kept_confidence
from espnet_plugin.nets.mamba import BiMamba

SUBSAMPLING_LAYERS = {
    "conv2d": Conv2dSubsampling,
    "conv2d2": Conv2dSubsampling2,
    "conv2d6": Conv2dSubsampling6,
    "conv2d8": Conv2dSubsampling8,
}
INPUT_LAYERS = (*SUBSAMPLING_LAYERS, "linear")


class LinearInput(nn.Module):
    """Frame-rate front end (no subsampling), with the subsampling layers' (x, masks) contract."""

    def __init__(self, input_size: int, d_model: int, dropout_rate: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, d_model), nn.LayerNorm(d_model), nn.Dropout(dropout_rate), nn.ReLU()
        )

    def forward(self, x: torch.Tensor, masks: torch.Tensor):
        return self.layers(x), masks


def build_input_layer(input_layer: str, input_size: int, d_model: int, dropout_rate: float) -> nn.Module:
    """ESPnet's front ends without a positional encoding: the mixers carry position themselves
    (Mamba by its recurrence, attention by rotary embeddings)."""
    if input_layer in SUBSAMPLING_LAYERS:
        return SUBSAMPLING_LAYERS[input_layer](input_size, d_model, dropout_rate, nn.Dropout(dropout_rate))
    if input_layer == "linear":
        return LinearInput(input_size, d_model, dropout_rate)
    raise ValueError(f"unknown input_layer '{input_layer}': expected one of {list(INPUT_LAYERS)}")


class FullRateOutput(NamedTuple):
    """What an encoder with ``output: ctc_dechunked`` computed beside its compressed output."""

    compressed: torch.Tensor  # (batch, chunks, d_model) the encoder output: the decoder's
    full_rate: torch.Tensor  # (batch, time, d_model) the dechunked output: CTC's
    lengths: torch.Tensor  # (batch,) valid full-rate frames


class ChunkingStage(DynamicChunking):
    """Dynamic chunking placed after block ``after_block`` of an encoder.

    ``output``: "compressed" leaves the encoder output at the chunked rate (CTC and the decoder's
    cross-attention then work on fewer frames: the inference saving), "dechunked" restores the
    input rate at the end, "ctc_dechunked" does both: the decoder attends to the compressed output
    (the encoder's output) and CTC reads the dechunked one, which the encoder hands beside it
    (:meth:`full_rate`; ``model: espnet_aux`` gives it to CTC in training and decoding). A
    compressed output carries each kept frame's confidence as a straight-through 1, so that the
    ASR loss reaches the router as H-Net's dechunking lets it (otherwise only the ratio loss would
    train the router). ``min_keep_ratio`` keeps at least that fraction of each utterance's frames
    (highest boundary probability first), the same in training and decoding, so a compressed
    output stays long enough for CTC: 0.25 of 40 ms frames is 6 frames a second, above the token
    rate of BPE units in read speech.
    """

    OUTPUTS = ("compressed", "dechunked", "ctc_dechunked")

    def __init__(self, d_model: int, after_block: int, output: str = "compressed",
                 min_keep_ratio: float = 0.25, **chunking_options):
        if output not in self.OUTPUTS:
            raise ValueError(f"unknown dynamic_chunking output '{output}': expected one of {self.OUTPUTS}")
        super().__init__(d_model, dechunks=output != "compressed", **chunking_options)
        if not 0.0 <= min_keep_ratio <= 1.0:
            raise ValueError(f"dynamic_chunking min_keep_ratio must be in [0, 1], got {min_keep_ratio}")
        self.after_block = after_block
        self.output = output
        self.min_keep_ratio = min_keep_ratio
        self.ctc_reads_full_rate = False  # set by the model whose CTC calls full_rate
        self._latest: Optional[FullRateOutput] = None

    def compress(self, xs: torch.Tensor, mask: torch.Tensor):
        lengths = mask.sum(dim=1)
        min_lengths = torch.ceil(lengths * self.min_keep_ratio).long()
        xs, _, state = self.chunk(xs, lengths, min_lengths=min_lengths)
        if self.output != "dechunked":  # a compressed output: this trains the router too
            xs = xs * kept_confidence(state)[..., None].to(xs.dtype)
        return xs, state.chunk_mask, state

    def hand_full_rate(self, output: FullRateOutput) -> None:
        """Keep the latest full-rate output for CTC (``output: ctc_dechunked``)."""
        if not self.ctc_reads_full_rate:
            raise RuntimeError("dynamic_chunking output 'ctc_dechunked' needs model: espnet_aux, "
                               "whose CTC reads the full-rate output (another model's CTC would "
                               "score the compressed one)")
        self._latest = output

    def full_rate(self, compressed: torch.Tensor,
                  lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The full-rate output and its lengths that the encoder's latest call computed beside
        ``compressed`` (that output, or its first utterances as ESPnet's beam search passes them).
        ``lengths`` (the compressed ones) is only checked for the batch size."""
        latest = self._latest
        batch = compressed.size(0) if compressed.dim() == 3 else 1
        if (latest is None or compressed.data_ptr() != latest.compressed.data_ptr()
                or compressed.shape[-2:] != latest.compressed.shape[-2:]
                or (lengths is not None and len(lengths) != batch)):
            raise RuntimeError("CTC of a 'ctc_dechunked' encoder was given a tensor that is not "
                               "the encoder's latest output: encode the utterances first and "
                               "give CTC what encode returned")
        return latest.full_rate[:batch], latest.lengths[:batch]


def subsampled_lengths(front_end: nn.Module, lengths: torch.Tensor) -> torch.Tensor:
    """Output lengths from the convolutions' own arithmetic along time.

    ESPnet's subsampling layers slice the input mask instead, which counts up to two frames too
    many for an utterance shorter than its batch: frames whose receptive field reaches into the
    padding. Using exact lengths keeps padding out of every valid frame.
    """
    for conv in front_end.modules():
        if isinstance(conv, nn.Conv2d):
            span = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
            lengths = (lengths + 2 * conv.padding[0] - span) // conv.stride[0] + 1
    return lengths


class BlockStackEncoder(AbsEncoder):
    """Front end, a stack of blocks ``block(x, mask)``, a final LayerNorm; ESPnet's encoder
    contract (returns ``(out, out_lens, None)``, or ``((out, intermediate), ...)`` with
    intermediate CTC, like ESPnet's Conformer).

    ``dynamic_chunking`` (a dict: ``after_block``, ``target_ratio``, ``ratio_loss_weight``,
    ``output``, ``min_keep_ratio``) inserts :class:`ChunkingStage`; its ratio loss reaches the
    training loss under ``model: espnet_aux``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        blocks: Sequence[nn.Module],
        input_layer: str = "conv2d",
        dropout_rate: float = 0.1,
        interctc_layer_idx: Sequence[int] = (),
        interctc_use_conditioning: bool = False,
        dynamic_chunking: Optional[dict] = None,
    ):
        super().__init__()
        self._output_size = output_size
        self.embed = build_input_layer(input_layer, input_size, output_size, dropout_rate)
        self.blocks = nn.ModuleList(blocks)
        self.after_norm = nn.LayerNorm(output_size)
        self.interctc_layer_idx = list(interctc_layer_idx)
        if any(not 0 < i < len(self.blocks) for i in self.interctc_layer_idx):
            raise ValueError(
                f"interctc_layer_idx {self.interctc_layer_idx} must lie in 1..{len(self.blocks) - 1}"
            )
        self.interctc_use_conditioning = interctc_use_conditioning
        self.conditioning_layer: Optional[nn.Module] = None  # set by ESPnetASRModel when used
        self.chunking: Optional[ChunkingStage] = None
        if dynamic_chunking is not None:
            self.chunking = ChunkingStage(output_size, **dynamic_chunking)
            if not 0 < self.chunking.after_block < len(self.blocks):
                raise ValueError(
                    f"dynamic_chunking after_block must lie in 1..{len(self.blocks) - 1}, "
                    f"got {self.chunking.after_block}"
                )
            self._check_interctc_rate()

    def _check_interctc_rate(self) -> None:
        """ESPnet scores intermediate CTC with the final output's lengths, so every intermediate
        layer must run at the output's frame rate: after the router when the output stays
        compressed, before it when the output is dechunked."""
        if self.chunking.output == "ctc_dechunked" and self.interctc_layer_idx:
            raise ValueError("interctc_layer_idx cannot be used with dynamic_chunking output "
                             "'ctc_dechunked': its CTC reads the full-rate output only")
        compressed = self.chunking.output == "compressed"
        wrong = [i for i in self.interctc_layer_idx if (i >= self.chunking.after_block) != compressed]
        if wrong:
            side = "at or after" if compressed else "before"
            raise ValueError(
                f"interctc_layer_idx {wrong} must lie {side} dynamic_chunking after_block "
                f"{self.chunking.after_block} with output '{self.chunking.output}': ESPnet scores "
                f"intermediate CTC with the encoder output's lengths"
            )

    def output_size(self) -> int:
        return self._output_size

    def subsample(self, xs_pad: torch.Tensor, ilens: torch.Tensor):
        """Front end: (features, lengths) -> (frames, valid-frame mask (batch, time))."""
        masks = ~make_pad_mask(ilens, maxlen=xs_pad.size(1)).to(xs_pad.device).unsqueeze(1)
        too_short, limit = check_short_utt(self.embed, xs_pad.size(1))
        if too_short:
            raise TooShortUttError(
                f"has {xs_pad.size(1)} frames and is too short for subsampling "
                f"(it needs more than {limit} frames), return empty results",
                xs_pad.size(1),
                limit,
            )
        xs, _ = self.embed(xs_pad, masks)
        olens = subsampled_lengths(self.embed, ilens.to(xs.device))
        return xs, torch.arange(xs.size(1), device=xs.device)[None, :] < olens[:, None]

    def forward(
        self,
        xs_pad: torch.Tensor,
        ilens: torch.Tensor,
        prev_states: Optional[torch.Tensor] = None,
        ctc=None,
    ):
        xs, mask = self.subsample(xs_pad, ilens)
        intermediate_outs = []
        chunk_state = None
        for index, block in enumerate(self.blocks, start=1):
            xs = block(xs, mask)
            if self.chunking is not None and index == self.chunking.after_block:
                xs, mask, chunk_state = self.chunking.compress(xs, mask)
            if index in self.interctc_layer_idx:
                inter_out = self.after_norm(xs)
                intermediate_outs.append((index, inter_out))
                if self.interctc_use_conditioning:
                    xs = xs + self.conditioning_layer(ctc.softmax(inter_out))
        if chunk_state is not None and self.chunking.output == "dechunked":
            xs, mask = self.chunking.dechunk(xs, chunk_state), chunk_state.valid
        if chunk_state is not None and self.chunking.output == "ctc_dechunked":
            full_rate = self.after_norm(self.chunking.dechunk(xs, chunk_state))
            xs = self.after_norm(xs)
            self.chunking.hand_full_rate(FullRateOutput(xs, full_rate, chunk_state.lengths))
        else:
            xs = self.after_norm(xs)
        olens = mask.sum(dim=1)
        if intermediate_outs:
            return (xs, intermediate_outs), olens, None
        return xs, olens, None


def macaron_blocks(num_blocks: int, d_model: int, make_mixer, linear_units: int,
                   dropout_rate: float, **block_options) -> list[MacaronBlock]:
    """``num_blocks`` Conformer layers, each with a fresh mixer from ``make_mixer()``."""
    return [
        MacaronBlock(d_model=d_model, mixer=make_mixer(), linear_units=linear_units,
                     dropout_rate=dropout_rate, **block_options)
        for _ in range(num_blocks)
    ]


class ConMambaEncoder(BlockStackEncoder):
    """ConMamba: Conformer macaron layers with bidirectional Mamba in place of self-attention.

    ``mamba_conf`` goes to :class:`espnet_plugin.nets.mamba.BiMamba` (``bidirectional``: shared,
    concat or none; ``d_state``, ``d_conv``, ``expand``, ...).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int = 144,
        linear_units: int = 576,
        num_blocks: int = 12,
        dropout_rate: float = 0.1,
        input_layer: str = "conv2d",
        macaron_style: bool = True,
        use_cnn_module: bool = True,
        cnn_module_kernel: int = 31,
        mamba_conf: Optional[dict] = None,
        interctc_layer_idx: Sequence[int] = (),
        interctc_use_conditioning: bool = False,
        dynamic_chunking: Optional[dict] = None,
    ):
        blocks = macaron_blocks(
            num_blocks, output_size, lambda: BiMamba(output_size, **(mamba_conf or {})),
            linear_units, dropout_rate, macaron_style=macaron_style,
            use_cnn_module=use_cnn_module, cnn_module_kernel=cnn_module_kernel,
        )
        super().__init__(
            input_size=input_size,
            output_size=output_size,
            blocks=blocks,
            input_layer=input_layer,
            dropout_rate=dropout_rate,
            interctc_layer_idx=interctc_layer_idx,
            interctc_use_conditioning=interctc_use_conditioning,
            dynamic_chunking=dynamic_chunking,
        )


class ConformerXEncoder(BlockStackEncoder):
    """Conformer with a choice of attention: ``attention_type`` mha, gqa, mla or linear, and
    ``attention_conf`` for its own options (``n_kv_heads``, ``kv_latent_dim``, ``rope_dim`` ...)."""

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        attention_type: str = "mha",
        attention_conf: Optional[dict] = None,
        attention_dropout_rate: float = 0.0,
        linear_units: int = 1024,
        num_blocks: int = 12,
        dropout_rate: float = 0.1,
        input_layer: str = "conv2d",
        macaron_style: bool = True,
        use_cnn_module: bool = True,
        cnn_module_kernel: int = 31,
        interctc_layer_idx: Sequence[int] = (),
        interctc_use_conditioning: bool = False,
        dynamic_chunking: Optional[dict] = None,
    ):
        blocks = macaron_blocks(
            num_blocks, output_size,
            lambda: build_attention(attention_type, output_size, attention_heads,
                                    attention_dropout_rate, **(attention_conf or {})),
            linear_units, dropout_rate, macaron_style=macaron_style,
            use_cnn_module=use_cnn_module, cnn_module_kernel=cnn_module_kernel,
        )
        super().__init__(
            input_size=input_size,
            output_size=output_size,
            blocks=blocks,
            input_layer=input_layer,
            dropout_rate=dropout_rate,
            interctc_layer_idx=interctc_layer_idx,
            interctc_use_conditioning=interctc_use_conditioning,
            dynamic_chunking=dynamic_chunking,
        )


class BranchformerXEncoder(BlockStackEncoder):
    """Branchformer with a choice of attention for its global branch (same options as
    ``conformer_x``); the cgMLP local branch and the concatenation merge are Branchformer's."""

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        attention_type: str = "mha",
        attention_conf: Optional[dict] = None,
        attention_dropout_rate: float = 0.0,
        cgmlp_linear_units: int = 2048,
        cgmlp_conv_kernel: int = 31,
        num_blocks: int = 12,
        dropout_rate: float = 0.1,
        input_layer: str = "conv2d",
        interctc_layer_idx: Sequence[int] = (),
        interctc_use_conditioning: bool = False,
        dynamic_chunking: Optional[dict] = None,
    ):
        blocks = [
            BranchformerBlock(
                d_model=output_size,
                mixer=build_attention(attention_type, output_size, attention_heads,
                                      attention_dropout_rate, **(attention_conf or {})),
                cgmlp_linear_units=cgmlp_linear_units,
                cgmlp_conv_kernel=cgmlp_conv_kernel,
                dropout_rate=dropout_rate,
            )
            for _ in range(num_blocks)
        ]
        super().__init__(
            input_size=input_size,
            output_size=output_size,
            blocks=blocks,
            input_layer=input_layer,
            dropout_rate=dropout_rate,
            interctc_layer_idx=interctc_layer_idx,
            interctc_use_conditioning=interctc_use_conditioning,
            dynamic_chunking=dynamic_chunking,
        )
