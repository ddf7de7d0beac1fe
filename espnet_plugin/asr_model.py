"""``model: espnet_aux``: ESPnet's ASR model plus the auxiliary losses its layers report.

Layers that mix in ``espnet_plugin.nets.aux_loss.AuxLossMixin`` (e.g. dynamic chunking's ratio
loss) record weighted losses and stats during the forward pass; this model adds the losses to
ESPnet's training loss and logs the stats next to ``loss_ctc`` / ``acc``. With no such layer it
is ``model: espnet`` exactly.
"""

import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.espnet_model import ESPnetASRModel
from espnet2.torch_utils.device_funcs import force_gatherable

from espnet_plugin.nets.aux_loss import collect_aux
from espnet_plugin.nets.encoders import ChunkingStage


class FullRateCTC(CTC):
    """ESPnet's CTC (its weights, names and options) for an encoder with dynamic chunking's
    ``output: ctc_dechunked``: ESPnet's model and beam search give CTC what they give the decoder,
    the compressed output; this CTC scores the dechunked, full-rate output of the same utterances
    instead, which the encoder computed beside it (``ChunkingStage.full_rate``)."""

    def forward(self, hs_pad, hlens, ys_pad, ys_lens):
        return super().forward(*self.full_rate(hs_pad, hlens), ys_pad, ys_lens)

    def log_softmax(self, hs_pad):
        return super().log_softmax(self.full_rate(hs_pad)[0])

    def argmax(self, hs_pad):
        return super().argmax(self.full_rate(hs_pad)[0])


def frame_log_softmax(ctc: CTC, frames: torch.Tensor) -> torch.Tensor:
    """CTC's log-probabilities of the frames it scores, given as they are (the plugin's batched
    search, which pads each utterance's :func:`ctc_input`)."""
    return CTC.log_softmax(ctc, frames) if isinstance(ctc, FullRateCTC) else ctc.log_softmax(frames)


def frame_projection(ctc: CTC):
    """The linear layer whose log-softmax is all that CTC's frame posteriors are (ESPnet's CTC,
    and :class:`FullRateCTC` on the frames it scores), or None for a CTC that does more."""
    plain = type(ctc).log_softmax in (CTC.log_softmax, FullRateCTC.log_softmax)
    linear = getattr(ctc, "ctc_lo", None)
    return linear if plain and isinstance(linear, torch.nn.Linear) else None


def ctc_input(model: ESPnetASRModel, encoder_out: torch.Tensor,
              encoder_out_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model's CTC scores for the output of its ``encode``: that output, or with
    ``output: ctc_dechunked`` the full-rate one beside it."""
    if isinstance(model.ctc, FullRateCTC):
        return model.ctc.full_rate(encoder_out, encoder_out_lens)
    return encoder_out, encoder_out_lens


class ESPnetAuxLossASRModel(ESPnetASRModel):
    """CTC/attention (or transducer) ASR model whose loss includes its layers' auxiliary losses.

    Stats gain ``<module path>.<name>`` entries (e.g. ``encoder.chunking.compression``) and
    ``loss`` becomes the total that is optimised. Keys depend only on the architecture, so every
    DDP rank reports the same ones.

    Auxiliary weights mean what they mean in their papers, next to a loss per token: ESPnet's loss
    sums over each utterance's tokens (``length_normalized_loss: false``, its default), so the aux
    losses are multiplied by the batch's mean token count. Without that, H-Net's ratio weight 0.03
    would be some 50 times weaker here than in the paper, and the router would barely move.

    With dynamic chunking's ``output: ctc_dechunked``, its CTC becomes a :class:`FullRateCTC`
    (the same module, made to read the full-rate output), in training and in ESPnet's decoding.
    """

    def __init__(self, *args, length_normalized_loss: bool = False, **kwargs):
        super().__init__(*args, length_normalized_loss=length_normalized_loss, **kwargs)
        self.length_normalized_loss = length_normalized_loss
        chunking = getattr(self.encoder, "chunking", None)
        if (isinstance(chunking, ChunkingStage) and chunking.output == "ctc_dechunked"
                and self.ctc is not None):
            self.ctc.__class__ = FullRateCTC  # ESPnet built it from ctc_conf; same state
            self.ctc.full_rate = chunking.full_rate
            chunking.ctc_reads_full_rate = True

    def forward(
        self,
        speech: torch.Tensor,
        speech_lengths: torch.Tensor,
        text: torch.Tensor,
        text_lengths: torch.Tensor,
        **kwargs,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        # Drop records nobody collected: ``encode`` in decoding, checkpoint recomputation, ...
        collect_aux(self)
        loss, stats, weight = super().forward(speech, speech_lengths, text, text_lengths, **kwargs)
        aux = collect_aux(self)
        tokens = 1.0 if self.length_normalized_loss else text_lengths.float().mean()
        loss = loss + tokens * sum(aux.losses.values())
        stats = {**stats, **aux.stats, "loss": loss.detach()}
        # super() already made loss/stats/weight gatherable; this does the same for the aux stats.
        return force_gatherable((loss, stats, weight), loss.device)
