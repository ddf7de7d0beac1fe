"""CTC prefix scores of every hypothesis of a batch of utterances at once.

The algorithm is ESPnet's ``CTCPrefixScoreTH`` (Watanabe et al. 2017, algorithm 2, vectorised over
hypotheses by Seki et al. 2019), and its scores are the same. What differs is what a step costs:
ESPnet's loops in Python over the hypotheses three times a step (for the last token's blank path,
to scatter the candidates' scores and for end of sentence), which at dozens of utterances times
the beam dominates; here those are tensor operations. The frames a step walks start where the
prefix can first end (its length) and stop at the longest utterance still in the batch, and only
the pre-beam candidates are scored. Utterances that finish leave the batch (``select``).

Hypothesis ``n`` belongs to utterance ``n // beam`` (utterance-major), the layout of the beam search
that calls this.
"""

from typing import Optional

import torch

LOG_ZERO = -1e10  # ESPnet's logzero: finite, so sums of it never make NaN


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
        self.beam, self.blank, self.eos = beam, blank, eos
        frames = torch.arange(logp.size(1), device=logp.device)
        padded = frames[None, :] >= lengths.to(logp.device)[:, None]  # (utterances, frames)
        logp = logp.masked_fill(padded[..., None], LOG_ZERO)
        # Past its end an utterance emits blanks with probability 1, so its paths carry on as
        # they are, as in ESPnet.
        logp[..., blank] = logp[..., blank].masked_fill(padded, 0.0)
        self.x = logp.transpose(0, 1)  # (frames, utterances, vocab)
        self.lengths = lengths.to(logp.device)
        # Hypotheses' forward variables (frames, 2, hypotheses): paths of the prefix ending in
        # its last token (0) or in a blank (1); and each prefix's score (hypotheses,).
        rows = self._utterance_of_rows(len(lengths))
        self.r = torch.full((self.x.size(0), 2, len(rows)), LOG_ZERO, dtype=logp.dtype,
                            device=logp.device)
        self.r[:, 1] = torch.cumsum(self.x[:, rows, blank], 0)
        self.prefix_score = torch.zeros(len(rows), dtype=logp.dtype, device=logp.device)
        self._pending = None

    def _utterance_of_rows(self, utterances: int) -> torch.Tensor:
        return torch.arange(utterances, device=self.x.device).repeat_interleave(self.beam)

    def score(self, last: torch.Tensor, prefix_length: int,
              candidates: Optional[torch.Tensor]) -> torch.Tensor:
        """Scores (hypotheses, vocab) of each hypothesis' next tokens: log psi(prefix + c) -
        log psi(prefix) for the ``candidates`` (hypotheses, k; None: every token) and
        end-of-sentence, ``LOG_ZERO`` - log psi(prefix) for the others.

        ``last``: each hypothesis' last token (hypotheses,); ``prefix_length``: tokens in each
        prefix, not counting the start symbol."""
        n_frames, n_utts, vocab = self.x.shape
        rows = self._utterance_of_rows(n_utts)
        if candidates is None:
            candidates = torch.arange(vocab, device=self.x.device).expand(len(rows), -1)
        # Log-posteriors of the candidates and of blank, per hypothesis (frames, hyps, k).
        x_token = self.x[:, rows[:, None], candidates]
        x_blank = self.x[:, rows, self.blank][..., None]
        r_prev = self.r
        r_sum = torch.logsumexp(r_prev, 1)  # (frames, hyps): every path of the prefix
        # A candidate equal to the last token needs a blank between: only blank-ending paths.
        repeat = (candidates == last[:, None])[None]
        log_phi = torch.where(repeat, r_prev[:, 1, :, None], r_sum[..., None])
        r = torch.full((n_frames, 2) + candidates.shape, LOG_ZERO, dtype=self.x.dtype,
                       device=self.x.device)
        if prefix_length == 0:
            r[0, 0] = x_token[0]
        start = min(max(prefix_length, 1), n_frames)  # a prefix longer than the input fits none
        for t in range(start, n_frames):
            r[t, 0] = torch.logaddexp(r[t - 1, 0], log_phi[t - 1]) + x_token[t]
            r[t, 1] = torch.logaddexp(r[t - 1, 0], r[t - 1, 1]) + x_blank[t]
        # psi: the candidate emitted first at frame t, after any path of the prefix to t - 1.
        log_phi_x = torch.cat((log_phi[:1], log_phi[:-1])) + x_token
        psi = torch.logsumexp(torch.cat((log_phi_x[start:], r[start - 1, 0][None])), 0)
        scores = torch.full((len(rows), vocab), LOG_ZERO, dtype=self.x.dtype,
                            device=self.x.device)
        scores.scatter_(1, candidates, psi)
        # End of sentence: every path of the prefix to the utterance's last frame.
        scores[:, self.eos] = r_sum[self.lengths[rows] - 1, torch.arange(len(rows))]
        if self.eos != self.blank:
            scores[:, self.blank] = LOG_ZERO
        self._pending = (r, scores, candidates)
        return scores - self.prefix_score[:, None]

    def select(self, rows: torch.Tensor, tokens: torch.Tensor,
               utterances: Optional[torch.Tensor] = None) -> None:
        """Make hypothesis ``rows[i]`` of the last ``score``, extended by ``tokens[i]``, the new
        i-th; with ``utterances``, only those (indices) stay in the batch, and ``rows`` holds
        their hypotheses only."""
        r, scores, candidates = self._pending
        self.prefix_score = scores[rows, tokens]
        # A token that was not a candidate (end of sentence) ends its hypothesis: any column.
        column = (candidates[rows] == tokens[:, None]).int().argmax(1)
        self.r = r[:, :, rows, column]
        self._pending = None
        if utterances is not None:
            self.x = self.x[:, utterances]
            self.lengths = self.lengths[utterances]
            longest = int(self.lengths.max())
            self.x, self.r = self.x[:longest], self.r[:longest]
