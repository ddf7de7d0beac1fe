"""The plugin's ESPnet2 encoders: one stack (front end, blocks, final norm, intermediate CTC),
with the block shape and the sequence mixer chosen by each registered subclass.

``encoder: conmamba``  Conformer layers with bidirectional Mamba as the mixer;
``encoder: conformer_x``  Conformer layers with any attention type (MHA, GQA, MLA, linear);
``encoder: branchformer_x``  Branchformer layers with any attention type.
"""

from typing import Optional, Sequence

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
from espnet_plugin.nets.blocks import MacaronBlock
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


class BlockStackEncoder(AbsEncoder):
    """Front end, a stack of blocks ``block(x, mask)``, a final LayerNorm; ESPnet's encoder
    contract (returns ``(out, out_lens, None)``, or ``((out, intermediate), ...)`` with
    intermediate CTC, like ESPnet's Conformer)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        blocks: Sequence[nn.Module],
        input_layer: str = "conv2d",
        dropout_rate: float = 0.1,
        interctc_layer_idx: Sequence[int] = (),
        interctc_use_conditioning: bool = False,
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
        xs, masks = self.embed(xs_pad, masks)
        return xs, masks[:, 0]

    def forward(
        self,
        xs_pad: torch.Tensor,
        ilens: torch.Tensor,
        prev_states: Optional[torch.Tensor] = None,
        ctc=None,
    ):
        xs, mask = self.subsample(xs_pad, ilens)
        intermediate_outs = []
        for index, block in enumerate(self.blocks, start=1):
            xs = block(xs, mask)
            if index in self.interctc_layer_idx:
                inter_out = self.after_norm(xs)
                intermediate_outs.append((index, inter_out))
                if self.interctc_use_conditioning:
                    xs = xs + self.conditioning_layer(ctc.softmax(inter_out))
        xs = self.after_norm(xs)
        olens = mask.sum(dim=1)
        if intermediate_outs:
            return (xs, intermediate_outs), olens, None
        return xs, olens, None


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
    ):
        blocks = [
            MacaronBlock(
                output_size,
                BiMamba(output_size, **(mamba_conf or {})),
                linear_units,
                dropout_rate,
                macaron_style=macaron_style,
                use_cnn_module=use_cnn_module,
                cnn_module_kernel=cnn_module_kernel,
            )
            for _ in range(num_blocks)
        ]
        super().__init__(
            input_size, output_size, blocks, input_layer, dropout_rate,
            interctc_layer_idx, interctc_use_conditioning,
        )
