"""CTC prefix scores of every hypothesis of a batch of utterances at once.

The scores are those of ESPnet's ``CTCPrefixScoreTH`` (Watanabe et al. 2017, algorithm 2,
vectorised over hypotheses by Seki et al. 2019); what a step costs, in time and memory, is not.
ESPnet runs the CTC forward recursion over every frame for every (hypothesis, pre-beam candidate)
pair, one frame at a time, loops in Python over the hypotheses three times a step, and keeps the
log-posteriors of every frame and token. Here:

* A candidate's prefix score needs no recursion: psi(h + c) = logsumexp over frames t of
  phi_{t-1}(h) + log p_t(c), where phi is what the prefix h already has: a weighted sum over
  frames in float64, each frame scaled by its most likely token, for the pre-beam candidates only
  (every token where there is no pre-beam).
* The forward variables of h + c are needed only for the ``beam`` pairs that survive pruning, not
  for every candidate, and their recursion r_t = p_t (r_{t-1} + phi_{t-1}) is linear: it is solved
  for all frames at once by cumulative sums and ``logcumsumexp`` (float64 keeps the long sums of
  log-probabilities exact to 1e-10).
* Posteriors are read a token's column at a time (:class:`FramePosteriors`). Where the vocabulary
  is larger than the encoder output (BPE 5000 against 256 dimensions) no table of them is kept: a
  column is the encoder output times the token's row of CTC's projection, less each frame's
  normaliser, so an utterance's scorer holds its encoder output, not frames x vocabulary.
* Only the frames where the prefixes' paths are (a window) are read and kept. A prefix of n
  tokens has no path before frame n - 1, and a trained CTC is sure of its alignment: a few frames
  past the prefix's last token its paths must cross frames where CTC hears the next token, and
  they fall more than ``WINDOW_MARGIN`` (50 nats, a factor e^-50) below the prefix's most likely
  frame. Those frames are dropped, so a step reads a few dozen frames of a 25 s utterance, not
  hundreds. What that changes is the score of a token the prefix reaches only through dropped
  paths, more than 50 nats below the prefix itself: lower than ESPnet's, where no beam of real
  speech keeps it (the n-best stays ESPnet's, ``tests/test_batch_beam_search.py``).

Frames past the longest utterance still decoding are dropped as utterances finish (``select``),
and padded frames emit blank with probability 1, as in ESPnet. Hypothesis ``n`` belongs to
utterance ``n // beam`` (utterance-major).
"""

from abc import ABC, abstractmethod
from typing import List, Optional

import torch

from espnet_plugin.asr_model import frame_log_softmax, frame_projection

LOG_ZERO = -1e10  # ESPnet's logzero: finite, so sums of it never make NaN
WINDOW_MARGIN = 50.0  # nats below a prefix's most likely frame where its paths are dropped


def _log_cumulative_recursion(initial: torch.Tensor, inflow: torch.Tensor,
                              emission: torch.Tensor) -> torch.Tensor:
    """r_t = emission_t + logaddexp(r_{t-1}, inflow_t) for t = 0, 1, ... (frames first), from
    r_{-1} = ``initial``, in closed form: with E_t = emission_0 + ... + emission_t,
    r_t = E_t + logaddexp(initial, logcumsumexp_u(inflow_u - E_{u-1}))."""
    cumulative = torch.cumsum(emission, 0)
    before = torch.cat((torch.zeros_like(cumulative[:1]), cumulative[:-1]))
    return cumulative + torch.logaddexp(torch.logcumsumexp(inflow - before, 0), initial)


def _all_paths(r: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """log of a prefix's paths ending in its last token plus those ending in blank, the two
    kinds of forward variable along ``dim``."""
    return torch.logaddexp(*r.unbind(dim))


class FramePosteriors(ABC):
    """CTC's log-posteriors log p_t(c) of a padded batch of utterances, read by column in float64:
    ``columns(tokens, first, end)`` with ``tokens`` (utterances, m) gives frames ``first`` to
    ``end`` - 1 (frames, utterances, m), and ``weighted_sums`` the sums over such frames of
    p_t(c) / max_v p_t(v) that psi needs. Past its end
    an utterance emits blank with probability 1 and nothing else (LOG_ZERO), as in ESPnet."""

    def __init__(self, lengths: torch.Tensor, vocab: int, blank: int):
        self.lengths, self.vocab, self.blank = lengths, vocab, blank
        self.frame_max: torch.Tensor  # log max_v p_t(v) (utterances, frames)

    @property
    def n_frames(self) -> int:
        return int(self.lengths.max())

    @abstractmethod
    def columns(self, tokens: torch.Tensor, first: int = 0,
                end: Optional[int] = None) -> torch.Tensor:
        """log p_t(tokens[u, j]) of utterance u for frames ``first`` <= t < ``end`` (default:
        the last) (frames, utterances, m), padded frames set."""

    def weighted_sums(self, weights: torch.Tensor, tokens: torch.Tensor,
                      first: int = 0) -> torch.Tensor:
        """sum over frames t = ``first``, ``first`` + 1, ... of weights[t - first, u, i]
        p_t(tokens[u, i, j]) / max_v p_t(v), for ``weights`` (frames, utterances, rows) and
        ``tokens`` (utterances, rows, k): (utterances, rows, k)."""
        n_utts, rows, k = tokens.shape
        end = first + weights.size(0)
        scaled = (self.columns(tokens.view(n_utts, -1), first, end)
                  - self.frame_max.T[first:end, :, None]).exp()
        return (weights[..., None] * scaled.view(-1, n_utts, rows, k)).sum(0)

    # Names of what it holds per utterance, each (utterances, frames, ...).
    per_utterance: tuple = ("frame_max",)

    def keep(self, utterances: torch.Tensor) -> None:
        """Only these utterances (indices) stay, and only the frames the longest of them has."""
        self.lengths = self.lengths[utterances]
        for name in self.per_utterance:
            setattr(self, name, getattr(self, name)[utterances, :self.n_frames])

    def tensors(self) -> List[torch.Tensor]:
        """What it holds per utterance (for memory accounting)."""
        return [getattr(self, name) for name in self.per_utterance] + [self.lengths]

    def _padded(self, logp: torch.Tensor, tokens: torch.Tensor, first: int) -> torch.Tensor:
        """``logp`` (frames from ``first``, utterances, m) of ``tokens`` (utterances, m), padded
        frames set."""
        frames = torch.arange(first, first + logp.size(0), device=logp.device)
        padded = frames[:, None] >= self.lengths[None]  # (frames, utterances)
        fill = torch.where(tokens == self.blank, 0.0, LOG_ZERO).to(logp)
        return torch.where(padded[..., None], fill[None], logp)


class PosteriorTable(FramePosteriors):
    """Every frame's log-posteriors over the vocabulary, and their scaled form, kept (float64)."""

    per_utterance = ("logp", "scaled", "frame_max")

    def __init__(self, logp: torch.Tensor, lengths: torch.Tensor, blank: int):
        n_utts, _, vocab = logp.shape
        super().__init__(lengths, vocab, blank)
        every = torch.arange(vocab, device=logp.device).expand(n_utts, vocab)
        self.logp = self._padded(logp.double().transpose(0, 1), every, 0).transpose(0, 1)
        self.frame_max = self.logp.amax(-1)
        self.scaled = (self.logp - self.frame_max[..., None]).exp()

    def columns(self, tokens, first=0, end=None):
        logp = self.logp[:, first:end]
        return logp.gather(2, tokens[:, None, :].expand(-1, logp.size(1), -1)).transpose(0, 1)

    def weighted_sums(self, weights, tokens, first=0):
        """One batched product over the whole vocabulary (a table is kept only where it is no
        wider than a frame), then the tokens asked for."""
        scaled = self.scaled[:, first:first + weights.size(0)]
        products = torch.bmm(weights.permute(1, 2, 0), scaled)  # (utterances, rows, vocab)
        return products.gather(2, tokens)



class ProjectedPosteriors(FramePosteriors):
    """log p_t(c) = h_t . w_c + b_c - log sum_v exp(h_t . w_v + b_v), a column at a time, from the
    encoder output h and CTC's projection (w, b); each frame's normaliser and largest logit are
    computed once, an utterance at a time, so a table of logits never exists for more than one
    utterance."""

    per_utterance = ("hidden", "normaliser", "frame_max")

    def __init__(self, projection: torch.nn.Linear, frames: torch.Tensor,
                 lengths: torch.Tensor, blank: int):
        super().__init__(lengths, projection.out_features, blank)
        self.weight, self.bias = projection.weight, projection.bias
        self.hidden = frames.double()  # (utterances, frames, size)
        weight = self.weight.double()
        bias = None if self.bias is None else self.bias.double()
        self.normaliser = self.hidden.new_empty(self.hidden.shape[:2])
        top = self.hidden.new_empty(self.hidden.shape[:2])
        for n, h in enumerate(self.hidden):
            logits = torch.nn.functional.linear(h, weight, bias)  # (frames, vocab)
            self.normaliser[n] = torch.logsumexp(logits, -1)
            top[n] = logits.amax(-1)
        frames_in = torch.arange(frames.size(1), device=frames.device) < lengths[:, None]
        self.frame_max = (top - self.normaliser) * frames_in

    def columns(self, tokens, first=0, end=None):
        logits = torch.bmm(self.hidden[:, first:end],
                           self.weight[tokens].double().transpose(1, 2))
        if self.bias is not None:
            logits += self.bias[tokens].double()[:, None]
        logp = logits - self.normaliser[:, first:end, None]
        return self._padded(logp.transpose(0, 1), tokens, first)



def frame_posteriors(ctc, frames: torch.Tensor, lengths: torch.Tensor, blank: int,
                     candidates_only: bool) -> FramePosteriors:
    """The smaller way to hold ``ctc``'s posteriors of ``frames``: by projection where only
    candidates are scored and the vocabulary is larger than a frame, else as a table."""
    projection = frame_projection(ctc)
    lengths = lengths.to(frames.device)
    if candidates_only and projection is not None and projection.out_features > frames.size(-1):
        return ProjectedPosteriors(projection, frames, lengths, blank)
    return PosteriorTable(frame_log_softmax(ctc, frames), lengths, blank)


class CTCPrefixScores:
    """Prefix scores of a fixed number (``beam``) of hypotheses per utterance.

    Args:
        posteriors: CTC's log-posteriors of the utterances.
        beam: hypotheses per utterance.
        eos: the end-of-sentence token id.
        dtype: the dtype of the scores returned (that of the encoder output).
    """

    def __init__(self, posteriors: FramePosteriors, beam: int, eos: int,
                 dtype: torch.dtype = torch.float32):
        self.posteriors, self.beam, self.eos, self.dtype = posteriors, beam, eos, dtype
        self.blank = posteriors.blank
        # Forward variables (frames, 2, hypotheses) of the window, frames ``first`` to ``end`` -
        # 1 (LOG_ZERO outside): paths of the prefix that end in its last token (0) or in blank
        # (1); the prefix's own score (hypotheses,).
        blank_paths = torch.cumsum(self._blank_columns(0, posteriors.n_frames), 0)
        self.r, self.first = self._window(
            torch.stack((torch.full_like(blank_paths, LOG_ZERO), blank_paths), 1), 0)
        self.prefix_score = torch.zeros(blank_paths.size(1), dtype=torch.float64,
                                        device=blank_paths.device)
        self._pending = None

    @property
    def end(self) -> int:
        return self.first + self.r.size(0)

    @property
    def _hypothesis_lengths(self) -> torch.Tensor:
        """Frames of each hypothesis' utterance (hypotheses,)."""
        return self.posteriors.lengths.repeat_interleave(self.beam)

    def _window(self, r: torch.Tensor, first: int):
        """``r`` (its first frame ``first``) on the frames where some hypothesis' paths are
        within ``WINDOW_MARGIN`` of its most likely frame, and the first of those frames.

        Each utterance keeps the frames from its first such frame to its last and LOG_ZERO
        elsewhere, and a value below LOG_ZERO / 2 (a prefix without a path) is LOG_ZERO: what
        an utterance's hypotheses hold is the same alone as in any batch."""
        n_frames, n_hyps = r.size(0), r.size(2)
        total = _all_paths(r)  # (frames, hypotheses)
        frames = torch.arange(n_frames, device=r.device)
        lengths = self._hypothesis_lengths - first
        total = total.masked_fill(frames[:, None] >= lengths[None], LOG_ZERO)
        paths = (total > total.amax(0) - WINDOW_MARGIN) & (total > LOG_ZERO / 2)
        paths = paths.view(n_frames, -1, self.beam).any(2)  # (frames, utterances)
        lo = torch.where(paths, frames[:, None], n_frames).amin(0)
        hi = torch.where(paths, frames[:, None] + 1, 0).amax(0)
        inside = (frames[:, None] >= lo) & (frames[:, None] < hi)
        inside = inside.repeat_interleave(self.beam, 1)[:, None] & (r > LOG_ZERO / 2)
        r = torch.where(inside, r, LOG_ZERO)
        lo, hi = int(lo.min()), int(hi.max())
        if lo >= hi:  # no prefix has a path
            return r[:1], first
        return r[lo:hi], first + lo

    def _blank_columns(self, first: int, end: int) -> torch.Tensor:
        """log p_t(blank) of each hypothesis' utterance (frames ``first`` to ``end`` - 1,
        hypotheses)."""
        blank = torch.full((len(self.posteriors.lengths), 1), self.blank, dtype=torch.long,
                           device=self.posteriors.lengths.device)
        return self.posteriors.columns(blank, first, end)[..., 0].repeat_interleave(self.beam, 1)

    def _hypothesis_columns(self, tokens: torch.Tensor, first: int, end: int) -> torch.Tensor:
        """log p_t(tokens[n, j]) for hypothesis n (frames ``first`` to ``end`` - 1,
        hypotheses, j)."""
        n_hyps, k = tokens.shape
        by_utterance = tokens.reshape(n_hyps // self.beam, self.beam * k)
        return self.posteriors.columns(by_utterance, first, end).reshape(-1, n_hyps, k)

    def score(self, last: torch.Tensor, prefix_length: int,
              candidates: Optional[torch.Tensor]) -> torch.Tensor:
        """Scores (hypotheses, vocab) of each hypothesis' next tokens: log psi(prefix + c) -
        log psi(prefix) for the ``candidates`` (hypotheses, k; None: every token) and
        end-of-sentence, ``LOG_ZERO`` - log psi(prefix) for the others.

        ``last``: each hypothesis' last token (hypotheses,); ``prefix_length``: tokens in each
        prefix, not counting the start symbol."""
        n_hyps, vocab = self.r.size(2), self.posteriors.vocab
        columns = (torch.arange(vocab, device=self.r.device).expand(n_hyps, vocab)
                   if candidates is None else candidates)
        scores = torch.full((n_hyps, vocab), LOG_ZERO, dtype=torch.float64,
                            device=self.r.device)
        # A token emitted first at frame t follows the prefix's paths up to t - 1, one repeating
        # the last token only those that end in blank; at t = 0 only the empty prefix has a path
        # (log 1). A prefix of n tokens ends at frame n - 1 at the earliest.
        empty = prefix_length == 0
        first = 0 if empty else max(prefix_length, self.first + 1)
        end = min(self.end + 1, self.posteriors.n_frames)
        if first < end:
            r = self.r[max(first - 1, 0) - self.first:end - 1 - self.first]
            phi, repeat_phi = _all_paths(r), r[:, 1]
            if empty:
                start = r.new_zeros(1, n_hyps)
                phi, repeat_phi = torch.cat((start, phi)), torch.cat((start, repeat_phi))
            psi = self._psi(phi, repeat_phi, last, columns, first)
            scores.scatter_(1, columns, psi.clamp(min=LOG_ZERO))
        # End of sentence: every path of the prefix to the utterance's last frame (none where
        # that frame is outside the window).
        last_frame = self._hypothesis_lengths - 1
        r_end = self.r[(last_frame - self.first).clamp(0, self.r.size(0) - 1), :,
                       torch.arange(n_hyps)]
        r_end = _all_paths(r_end)
        held = (last_frame >= self.first) & (last_frame < self.end) & (r_end > LOG_ZERO / 2)
        scores[:, self.eos] = torch.where(held, r_end, LOG_ZERO)
        if self.eos != self.blank:
            scores[:, self.blank] = LOG_ZERO
        self._pending = (scores, last, prefix_length)
        return (scores - self.prefix_score[:, None]).to(self.dtype)

    def _psi(self, phi, repeat_phi, last, tokens, first) -> torch.Tensor:
        """log psi(prefix + token) of each hypothesis and of each of its ``tokens`` (hyps, k):
        a weighted sum over frames ``first``, ... of the scaled posteriors, each frame weighted
        by the prefix's paths times its most likely token's posterior (relative to the largest
        weight)."""
        n_frames, n_hyps = phi.shape
        end = first + n_frames
        weight = phi + self.posteriors.frame_max.T[first:end].repeat_interleave(self.beam, 1)
        top = weight.amax(0).clamp(min=LOG_ZERO)
        sums = self.posteriors.weighted_sums(
            (weight - top).exp().view(n_frames, -1, self.beam),
            tokens.reshape(-1, self.beam, tokens.size(1)), first)
        psi = sums.view(n_hyps, -1).log() + top[:, None]
        repeats = tokens == last[:, None]
        if repeats.any():
            emit_last = self._hypothesis_columns(last[:, None], first, end)[..., 0]
            psi_last = torch.logsumexp(repeat_phi + emit_last, 0)
            psi = torch.where(repeats, psi_last[:, None], psi)
        # A prefix without a path (LOG_ZERO throughout) makes none, in any window.
        return torch.where(top[:, None] > LOG_ZERO / 2, psi, LOG_ZERO)

    def select(self, rows: torch.Tensor, tokens: torch.Tensor,
               utterances: Optional[torch.Tensor] = None) -> None:
        """Make hypothesis ``rows[i]`` of the last ``score``, extended by ``tokens[i]``, the new
        i-th; with ``utterances``, only those (indices) stay in the batch, and ``rows`` holds
        their hypotheses only."""
        scores, last, prefix_length = self._pending
        self._pending = None
        self.prefix_score = scores[rows, tokens]
        self.r = self.r[:, :, rows]
        if utterances is not None:
            self.posteriors.keep(utterances)
            end = self.posteriors.n_frames
            if end <= self.first:  # the prefixes are longer than every utterance left
                self.r, self.first = torch.full_like(self.r[:1], LOG_ZERO), end - 1
            self.r = self.r[:end - self.first]
        self._extend(last[rows], tokens, prefix_length)

    def _extend(self, last, tokens, prefix_length) -> None:
        """Extend the prefixes by ``tokens``: their forward variables on the frames of the
        shorter prefixes' paths, then on as long as they hold paths, then the window of them."""
        n_frames, n_hyps = self.posteriors.n_frames, self.r.size(2)
        base = max(min(max(prefix_length, 1), n_frames) - 1, self.first)
        new = self.r.new_full((1, 2, n_hyps), LOG_ZERO)  # frame ``base``
        if prefix_length == 0:
            new[0, 0] = self._hypothesis_columns(tokens[:, None], 0, 1)[0, :, 0]
        r = self.r[base - self.first:]
        inflow = torch.where((tokens == last)[None], r[:, 1], _all_paths(r))
        pieces, stop = [new], max(min(self.end + 1, n_frames), base + 1)
        if stop > base + 1:
            pieces.append(self._paths(new[0], inflow[:stop - base - 1], tokens, base + 1, stop))
        top = _all_paths(torch.cat(pieces)).amax(0)
        lengths, grow = self._hypothesis_lengths, 8
        while stop < n_frames:  # past the shorter prefixes' paths: while the new ones go on
            tail = _all_paths(pieces[-1][-1], dim=0)
            going_on = (tail > top - WINDOW_MARGIN) & (tail > LOG_ZERO / 2) & (stop < lengths)
            if not going_on.any():
                break
            end = min(stop + grow, n_frames)
            no_inflow = inflow.new_full((end - stop, n_hyps), LOG_ZERO)
            pieces.append(self._paths(pieces[-1][-1], no_inflow, tokens, stop, end))
            top = torch.maximum(top, _all_paths(pieces[-1]).amax(0))
            stop, grow = end, 2 * grow
        self.r, self.first = self._window(torch.cat(pieces), base)

    def _paths(self, initial: torch.Tensor, inflow: torch.Tensor, tokens: torch.Tensor,
               first: int, end: int) -> torch.Tensor:
        """Forward variables (frames ``first`` to ``end`` - 1, 2, hypotheses) of the prefixes
        ending in ``tokens``, from theirs at frame ``first`` - 1 (``initial``, (2, hypotheses))
        and the shorter prefixes' paths ``inflow`` at frames ``first`` - 1 to ``end`` - 2."""
        emit = self._hypothesis_columns(tokens[:, None], first, end)[..., 0]
        on_token = _log_cumulative_recursion(initial[0], inflow, emit)
        on_blank = _log_cumulative_recursion(
            initial[1], torch.cat((initial[0][None], on_token[:-1])),
            self._blank_columns(first, end))
        return torch.stack((on_token, on_blank), 1)

    def tensors(self) -> List[torch.Tensor]:
        """What the scorer holds between steps (for memory accounting)."""
        return self.posteriors.tensors() + [self.r, self.prefix_score]
