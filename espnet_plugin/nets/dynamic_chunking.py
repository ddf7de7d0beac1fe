"""H-Net dynamic chunking (Hwang, Wang & Gu, 2025): an encoder drops the frames it finds redundant.

A router marks frame t a chunk boundary when it looks unlike frame t-1 (cosine of two learned
projections); the layers between ``chunk`` and ``dechunk`` run on the boundary frames only. The
dechunker brings their outputs back to the full frame rate with an EMA whose step is the boundary
probability and scales them by the router's confidence through a straight-through estimator: the
forward pass is unchanged, yet the main loss reaches the router. A ratio loss holds the fraction of
kept frames near a target.

Usage inside an encoder (``chunking = DynamicChunking(d_model)``)::

    x_chunked, chunk_lengths, state = chunking.chunk(x, lengths)
    x_chunked = inner_blocks(x_chunked, state.chunk_mask)
    x = chunking.dechunk(x_chunked, state)

``chunk`` records the weighted ratio loss and the achieved compression as auxiliary losses
(``espnet_plugin.nets.aux_loss``), which ``model: espnet_aux`` adds to the training loss.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from espnet_plugin.nets.aux_loss import AuxLossMixin
from espnet_plugin.nets.scan import linear_recurrence


@dataclass
class ChunkState:
    """What ``dechunk`` and the losses need to know about one ``chunk`` call (time: the full frame rate)."""

    hidden: torch.Tensor  # (batch, time, d_model) input of chunk, for the residual
    lengths: torch.Tensor  # (batch,) valid frames per utterance
    boundary_prob: torch.Tensor  # (batch, time) p_t; 0 on padding
    boundary: torch.Tensor  # (batch, time) router decisions b_t = [p_t >= 0.5]; False on padding
    kept: torch.Tensor  # (batch, time) frames kept: the boundaries plus those forced by min_lengths
    kept_index: torch.Tensor  # (batch, chunks) full-rate position of each chunked frame
    chunk_lengths: torch.Tensor  # (batch,) kept frames per utterance

    @property
    def valid(self) -> torch.Tensor:
        """(batch, time) True on the frames of each utterance, False on padding."""
        return _length_mask(self.lengths, self.boundary.size(1))

    @property
    def chunk_mask(self) -> torch.Tensor:
        """(batch, chunks) True on the chunked frames of each utterance, False on padding."""
        return _length_mask(self.chunk_lengths, self.kept_index.size(1))

    @property
    def compression_ratio(self) -> torch.Tensor:
        """Kept frames over valid frames, over the whole batch (0-dim)."""
        return self.chunk_lengths.sum() / self.lengths.sum().clamp(min=1)

    @property
    def boundary_ratio(self) -> torch.Tensor:
        """The router's own boundaries over valid frames (0-dim): what the ratio loss steers;
        ``compression_ratio`` also counts the frames that ``min_lengths`` forced in."""
        return self.boundary.sum() / self.lengths.sum().clamp(min=1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Routing and smoothing run in float32 at least: bf16 cosines decide boundaries badly."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _length_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    return torch.arange(max_length, device=lengths.device) < lengths[:, None]


def ratio_loss(
    boundary: torch.Tensor, boundary_prob: torch.Tensor, valid: torch.Tensor, target_ratio: float
) -> torch.Tensor:
    """H-Net's ratio loss; equals 1 at its minimum, where boundaries are a ``target_ratio`` share.

    With N = 1 / target_ratio, F the fraction of valid frames that are boundaries (no gradient)
    and G their mean boundary probability: N / (N - 1) * ((N - 1) F G + (1 - F)(1 - G)).
    """
    n = 1.0 / target_ratio
    count = valid.sum().clamp(min=1)
    fraction = (boundary & valid).sum() / count
    mean_prob = torch.where(valid, boundary_prob, 0.0).sum() / count
    return n / (n - 1) * ((n - 1) * fraction * mean_prob + (1 - fraction) * (1 - mean_prob))


class _OneWithGradient(torch.autograd.Function):
    """Straight-through estimator: 1 in the forward pass, the identity in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def kept_confidence(state: "ChunkState") -> torch.Tensor:
    """(batch, chunks) H-Net's confidence of each chunked frame, p_t (it was kept), as a straight-through
    1: multiplying a frame by it changes nothing forward and hands the router that frame's
    gradient."""
    return _OneWithGradient.apply(state.boundary_prob.gather(1, state.kept_index))


class DynamicChunking(AuxLossMixin, nn.Module):
    """Route, chunk and dechunk a padded batch ``(batch, time, d_model)`` with per-utterance lengths.

    Args:
        d_model: feature size.
        target_ratio: wanted share of kept frames (1/N for an N-fold compression), in (0, 1).
        ratio_loss_weight: weight of the ratio loss in the training loss (H-Net uses 0.03).
        dechunks: whether ``dechunk`` is used; without it the residual projection, which only
            dechunking reads, is not created (DDP refuses parameters that get no gradient).
    """

    def __init__(self, d_model: int, target_ratio: float = 0.5, ratio_loss_weight: float = 0.03,
                 dechunks: bool = True):
        super().__init__()
        if not 0.0 < target_ratio < 1.0:
            raise ValueError(
                f"DynamicChunking target_ratio must be in (0, 1) (1/N keeps one frame in N), "
                f"got {target_ratio}"
            )
        if ratio_loss_weight < 0:
            raise ValueError(
                f"DynamicChunking ratio_loss_weight must be >= 0, got {ratio_loss_weight}"
            )
        self.d_model = d_model
        self.target_ratio = target_ratio
        self.ratio_loss_weight = ratio_loss_weight
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.residual_proj = nn.Linear(d_model, d_model) if dechunks else None
        self.espnet_initialization_fn()

    def espnet_initialization_fn(self) -> None:
        """H-Net's start: the router compares raw frames, the residual is off (weight and bias 0).

        ESPnet's ``--init`` calls this after re-initialising every weight matrix.
        """
        with torch.no_grad():
            nn.init.eye_(self.q_proj.weight)
            nn.init.eye_(self.k_proj.weight)
            if self.residual_proj is not None:
                nn.init.zeros_(self.residual_proj.weight)
                nn.init.zeros_(self.residual_proj.bias)

    def route(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boundary probabilities p_t = (1 - cos(W_q x_t, W_k x_{t-1})) / 2, with p_1 = 1.

        Returns ``(boundary_prob, boundary)``, both (batch, time), 0 / False on padding. A valid p_t only
        reads frames t - 1 and t, so padding never reaches it.
        """
        q = F.normalize(_upcast(self.q_proj(x[:, 1:])), dim=-1)
        k = F.normalize(_upcast(self.k_proj(x[:, :-1])), dim=-1)
        prob = ((1 - (q * k).sum(-1)) / 2).clamp(0.0, 1.0)
        prob = F.pad(prob, (1, 0), value=1.0)
        valid = _length_mask(lengths, x.size(1))
        prob = torch.where(valid, prob, 0.0)
        return prob, valid & (prob >= 0.5)

    def chunk(
        self, x: torch.Tensor, lengths: torch.Tensor, min_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, ChunkState]:
        """Keep the boundary frames of each utterance, packed to the left.

        Args:
            x: (batch, time, d_model) hidden states.
            lengths: (batch,) valid frames per utterance.
            min_lengths: optional (batch,) least number of frames to keep per utterance, e.g. the
                token count so that CTC stays feasible on the chunked sequence. Short utterances
                keep, besides their boundaries, the non-boundary frames of highest p_t (capped at
                the utterance length). The ratio loss sees the router's own decisions only.

        Returns:
            ``(x_chunked (batch, chunks, d_model), chunk_lengths (batch,), state)``; chunked padding is 0 and
            ``state.chunk_mask`` marks the valid chunked frames.
        """
        if x.size(-1) != self.d_model:
            raise ValueError(f"DynamicChunking expects {self.d_model} features, got {x.size(-1)}")
        boundary_prob, boundary = self.route(x, lengths)
        kept = boundary
        if min_lengths is not None:
            if min_lengths.shape != lengths.shape:
                raise ValueError(
                    f"min_lengths must have the shape of lengths {tuple(lengths.shape)}, "
                    f"got {tuple(min_lengths.shape)}"
                )
            kept = _keep_at_least(boundary, boundary_prob, lengths, min_lengths)
        chunk_lengths = kept.sum(1)
        # A stable sort puts each utterance's kept frames first, in their original order.
        kept_index = torch.sort((~kept).int(), dim=1, stable=True).indices
        kept_index = kept_index[:, : int(chunk_lengths.max())]
        state = ChunkState(x, lengths, boundary_prob, boundary, kept, kept_index, chunk_lengths)
        x_chunked = x.gather(1, kept_index[..., None].expand(-1, -1, x.size(-1)))
        x_chunked = x_chunked.masked_fill(~state.chunk_mask[..., None], 0.0)

        loss = self.ratio_loss(state)
        self.report_aux(
            losses={"ratio_loss": self.ratio_loss_weight * loss},
            stats={
                "ratio_loss": loss,
                "compression": state.compression_ratio,
                "boundary_ratio": state.boundary_ratio,
            },
        )
        return x_chunked, chunk_lengths, state

    def dechunk(self, x_chunked: torch.Tensor, state: ChunkState) -> torch.Tensor:
        """Bring chunked states back to the full frame rate of ``chunk``'s input (padding is 0).

        z = EMA over the chunked frames with step P (their boundary probability), repeated up to
        the next kept frame, times the confidence c_t = p_t if kept else 1 - p_t through a
        straight-through estimator, plus the residual projection of ``chunk``'s input.
        """
        if self.residual_proj is None:
            raise RuntimeError("this DynamicChunking was built with dechunks=False")
        step = state.boundary_prob.gather(1, state.kept_index)[..., None]  # (batch, chunks, 1)
        smoothed = linear_recurrence((1 - step).expand_as(x_chunked), step * _upcast(x_chunked))
        latest_kept = (state.kept.cumsum(1) - 1).clamp(min=0)  # (batch, time)
        upsampled = smoothed.gather(1, latest_kept[..., None].expand(-1, -1, smoothed.size(-1)))
        confidence = torch.where(state.kept, state.boundary_prob, 1 - state.boundary_prob)
        out = upsampled * _OneWithGradient.apply(confidence)[..., None]
        out = out + self.residual_proj(state.hidden)
        return out.to(state.hidden.dtype).masked_fill(~state.valid[..., None], 0.0)

    def ratio_loss(self, state: ChunkState) -> torch.Tensor:
        """Unweighted ratio loss of one ``chunk`` call (1 when on target)."""
        return ratio_loss(state.boundary, state.boundary_prob, state.valid, self.target_ratio)


def _keep_at_least(
    boundary: torch.Tensor,
    boundary_prob: torch.Tensor,
    lengths: torch.Tensor,
    min_lengths: torch.Tensor,
) -> torch.Tensor:
    """Add to ``boundary`` the non-boundary frames of highest p until min_lengths are kept."""
    candidates = _length_mask(lengths, boundary.size(1)) & ~boundary
    wanted = torch.minimum(min_lengths.to(lengths.dtype), lengths)
    missing = (wanted - boundary.sum(1)).clamp(min=0)
    score = torch.where(candidates, boundary_prob, -1.0)  # every candidate ranks first
    rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return boundary | (candidates & (rank < missing[:, None]))
