"""CTC prefix scores of every hypothesis of a batch of utterances at once.

The scores are those of ESPnet's ``CTCPrefixScoreTH`` (Watanabe et al. 2017, algorithm 2,
vectorised over hypotheses by Seki et al. 2019); what a step costs is not. ESPnet runs the CTC
forward recursion over every frame for every (hypothesis, pre-beam candidate) pair, one frame at a
time, and loops in Python over the hypotheses three times a step. Two observations remove nearly
all of that:

* A candidate's prefix score needs no recursion: psi(h + c) = sum over frames t of
  phi_{t-1}(h) p_t(c), where phi is what the prefix h already has. For all hypotheses and tokens
  at once that is one batched matrix product per step (in float64, each frame scaled by its most
  likely token), then only the pre-beam candidates and end of sentence keep their scores.
* The forward variables of h + c are needed only for the ``beam`` pairs that survive pruning, not
  for every candidate, and their recursion r_t = p_t (r_{t-1} + phi_{t-1}) is linear: it is solved
  for all frames at once by cumulative sums and ``logcumsumexp`` (float64 keeps the long sums of
  log-probabilities exact to 1e-10).

Frames before a prefix can end are skipped, frames past the longest utterance still decoding are
dropped as utterances finish (``select``), and padded frames emit blank with probability 1, as in
ESPnet. Hypothesis ``n`` belongs to utterance ``n // beam`` (utterance-major).
"""

from typing import Optional

import torch

LOG_ZERO = -1e10  # ESPnet's logzero: finite, so sums of it never make NaN


def _log_cumulative_recursion(initial: torch.Tensor, inflow: torch.Tensor,
                              emission: torch.Tensor) -> torch.Tensor:
    """r_t = emission_t + logaddexp(r_{t-1}, inflow_t) for t = 0, 1, ... (frames first), from
    r_{-1} = ``initial``, in closed form: with E_t = emission_0 + ... + emission_t,
    r_t = E_t + logaddexp(initial, logcumsumexp_u(inflow_u - E_{u-1}))."""
    cumulative = torch.cumsum(emission, 0)
    before = torch.cat((torch.zeros_like(cumulative[:1]), cumulative[:-1]))
    return cumulative + torch.logaddexp(torch.logcumsumexp(inflow - before, 0), initial)


class CTCPrefixScores:
    """Prefix scores of a fixed number (``beam``) of hypotheses per utterance.

    Args:
        logp: CTC log-posteriors (utterances, frames, vocab), padded.
        lengths: frames of each utterance (utterances,).
        beam: hypotheses per utterance.
        blank, eos: the blank and end-of-sentence token ids.
    """

    def __init__(self, logp: torch.Tensor, lengths: torch.Tensor, beam: int, blank: int,
                 eos: int):
        self.beam, self.blank, self.eos, self.dtype = beam, blank, eos, logp.dtype
        self.lengths = lengths.to(logp.device)
        frames = torch.arange(logp.size(1), device=logp.device)
        padded = frames[None, :] >= self.lengths[:, None]  # (utterances, frames)
        logp = logp.double().masked_fill(padded[..., None], LOG_ZERO)
        # Past its end an utterance emits blank with probability 1: its paths carry on as
        # they are, and nothing else can be emitted there.
        logp[..., blank] = logp[..., blank].masked_fill(padded, 0.0)
        self.logp = logp  # (utterances, frames, vocab)
        # Each frame's posteriors over its most likely token, as probabilities, for psi.
        self.frame_max = logp.amax(-1)  # (utterances, frames)
        self.scaled = (logp - self.frame_max[..., None]).exp()
        # Forward variables (frames, 2, hypotheses): paths of the prefix that end in its last
        # token (0) or in blank (1); the prefix's own score (hypotheses,).
        rows = self._utterance_of_rows()
        self.r = torch.full((logp.size(1), 2, len(rows)), LOG_ZERO, dtype=torch.float64,
                            device=logp.device)
        self.r[:, 1] = torch.cumsum(logp[rows, :, blank].T, 0)
        self.prefix_score = torch.zeros(len(rows), dtype=torch.float64, device=logp.device)
        self._pending = None

    def _utterance_of_rows(self) -> torch.Tensor:
        return torch.arange(len(self.lengths), device=self.logp.device).repeat_interleave(
            self.beam)

    def score(self, last: torch.Tensor, prefix_length: int,
              candidates: Optional[torch.Tensor]) -> torch.Tensor:
        """Scores (hypotheses, vocab) of each hypothesis' next tokens: log psi(prefix + c) -
        log psi(prefix) for the ``candidates`` (hypotheses, k; None: every token) and
        end-of-sentence, ``LOG_ZERO`` - log psi(prefix) for the others.

        ``last``: each hypothesis' last token (hypotheses,); ``prefix_length``: tokens in each
        prefix, not counting the start symbol."""
        n_utts, n_frames, vocab = self.logp.shape
        rows = self._utterance_of_rows()
        r_sum = torch.logaddexp(self.r[:, 0], self.r[:, 1])  # (frames, hyps)
        start = min(max(prefix_length, 1), n_frames)
        # Paths of the prefix up to t - 1, for a token emitted first at t (a token other than
        # the last one); at t = 0 only the empty prefix has a path (log 1).
        phi = torch.cat((r_sum.new_full((1, len(rows)), 0.0 if prefix_length == 0 else
                                        float("-inf")), r_sum[:-1]))
        phi[1:start] = float("-inf")
        weight = phi + self.frame_max[rows].T  # (frames, hyps)
        top = weight.amax(0).clamp(min=LOG_ZERO)
        products = torch.bmm((weight - top).exp().T.reshape(n_utts, self.beam, n_frames),
                             self.scaled)  # (utterances, beam, vocab)
        psi = products.reshape(len(rows), vocab).log() + top[:, None]
        # A token repeating the last one follows only the paths that end in blank.
        repeat_phi = torch.cat((phi[:1], self.r[:-1, 1]))
        repeat_phi[1:start] = float("-inf")
        emit_last = self.logp[rows, :, last].T  # (frames, hyps)
        psi[torch.arange(len(rows)), last] = torch.logsumexp(repeat_phi + emit_last, 0)
        psi = psi.clamp(min=LOG_ZERO)
        scores = torch.full_like(psi, LOG_ZERO)
        if candidates is None:
            scores = psi
        else:
            scores.scatter_(1, candidates, psi.gather(1, candidates))
        # End of sentence: every path of the prefix to the utterance's last frame.
        scores[:, self.eos] = r_sum[self.lengths[rows] - 1, torch.arange(len(rows))]
        if self.eos != self.blank:
            scores[:, self.blank] = LOG_ZERO
        self._pending = (scores, last, prefix_length)
        return (scores - self.prefix_score[:, None]).to(self.dtype)

    def select(self, rows: torch.Tensor, tokens: torch.Tensor,
               utterances: Optional[torch.Tensor] = None) -> None:
        """Make hypothesis ``rows[i]`` of the last ``score``, extended by ``tokens[i]``, the new
        i-th; with ``utterances``, only those (indices) stay in the batch, and ``rows`` holds
        their hypotheses only."""
        scores, last, prefix_length = self._pending
        self._pending = None
        self.prefix_score = scores[rows, tokens]
        utt = self._utterance_of_rows()[rows]
        r = self.r[:, :, rows]
        last = last[rows]
        if utterances is not None:
            self.lengths = self.lengths[utterances]
            longest = int(self.lengths.max())
            self.logp = self.logp[utterances, :longest]
            self.frame_max = self.frame_max[utterances, :longest]
            self.scaled = self.scaled[utterances, :longest]
            r = r[:longest]
        self.r = self._extended(r, last, utt, rows, tokens, prefix_length, utterances)

    def _extended(self, r, last, utt, rows, tokens, prefix_length, utterances) -> torch.Tensor:
        """Forward variables of the prefixes extended by ``tokens`` (frames, 2, hyps)."""
        n_frames = r.size(0)
        # Posteriors in the (possibly smaller) batch kept: utterance indices renumbered.
        if utterances is not None:
            renumber = torch.full((int(utterances.max()) + 1,), -1, dtype=torch.long,
                                  device=utt.device)
            renumber[utterances] = torch.arange(len(utterances), device=utt.device)
            utt = renumber[utt]
        emit = self.logp[utt, :, tokens].T  # (frames, hyps)
        emit_blank = self.logp[utt, :, self.blank].T
        r_sum = torch.logaddexp(r[:, 0], r[:, 1])
        phi = torch.where((tokens == last)[None], r[:, 1], r_sum)
        start = min(max(prefix_length, 1), n_frames)
        new = torch.full_like(r, LOG_ZERO)
        if prefix_length == 0:
            new[0, 0] = emit[0]
        initial = new[start - 1]
        new[start:, 0] = _log_cumulative_recursion(initial[0], phi[start - 1:-1], emit[start:])
        ends_in_token = new[start - 1:-1, 0]
        new[start:, 1] = _log_cumulative_recursion(initial[1], ends_in_token, emit_blank[start:])
        return new
