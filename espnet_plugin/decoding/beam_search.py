"""Joint CTC/attention beam search over a batch of utterances, with ESPnet's search rules.

ESPnet's ``BatchBeamSearch`` (espnet <= 202511) decodes one utterance at a time, rebuilding a
Python list of hypotheses and states at every step; espnet 202611 batches utterances but keeps
lists of per-hypothesis states. Here every state is a tensor whose row is a hypothesis: the
cached decoder's self-attention caches grow in place and are reordered by index after each
pruning, its cross-attention memory is projected once per utterance, and CTC prefix scoring is
vectorised over utterances (:mod:`espnet_plugin.decoding.ctc_prefix`). Each utterance owns
``beam`` rows, utterance-major; a row whose hypothesis ended is masked until pruning refills it,
and an utterance that is done leaves the batch.

The rules are ESPnet's, so an utterance gets the n-best that ``BatchBeamSearch`` gives it alone,
in any batch: the weighted sum of the full scorers, the pre-beam of ``int(1.5 * beam)`` tokens
by it, CTC on those, pruning to ``beam`` per utterance, end of sentence added at the last step,
``minlenratio`` and ``maxlenratio`` (0: end detection), ``nbest``, length normalisation.
"""

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch

from espnet_plugin.compat import Hypothesis, end_detect
from espnet_plugin.decoding.ctc_prefix import CTCPrefixScores, frame_posteriors
from espnet_plugin.nets.transformer_decoder import BeamState, CachedTransformerDecoder

logger = logging.getLogger(__name__)


class ListStateScorer:
    """An ESPnet full scorer that does not read the encoder output (a language model, the
    length bonus), its per-hypothesis states kept as its ``batch_score`` returns them."""

    def __init__(self, scorer):
        self.scorer = scorer

    def start(self, n_hyps: int) -> None:
        self.states = [self.scorer.init_state(None) for _ in range(n_hyps)]

    def step(self, yseq: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # ``like`` gives device and dtype; these scorers read no frame of it.
        scores, self.states = self.scorer.batch_score(yseq, self.states, like)
        return scores

    def select(self, rows: List[int]) -> None:
        if isinstance(self.states, list):
            self.states = [self.states[i] for i in rows]


class BatchedBeamSearch:
    """Beam search over padded encoder outputs of several utterances.

    Args:
        decoder: the attention decoder (None for CTC only), its weight ``weights["decoder"]``.
        ctc: the model's CTC module (None for attention only), weight ``weights["ctc"]``.
        scorers: other full scorers by name (language model, ``length_bonus``), each one that
            does not read the encoder output.
        weights: weight of each scorer by name.
        pre_beam_score_key: "full" (the weighted full scores choose the CTC candidates) or
            None (CTC scores every token).
    """

    def __init__(self, decoder: Optional[CachedTransformerDecoder], ctc: Optional[Any],
                 scorers: Dict[str, Any], weights: Dict[str, float], beam_size: int,
                 vocab_size: int, sos: int, eos: int, pre_beam_ratio: float = 1.5,
                 pre_beam_score_key: Optional[str] = "full", nbest: int = 1,
                 normalize_length: bool = False, token_list: Optional[List[str]] = None):
        if pre_beam_score_key not in (None, "full"):
            raise ValueError(f"pre_beam_score_key must be 'full' or None, got "
                             f"{pre_beam_score_key!r}")
        self.decoder, self.ctc = decoder, ctc
        self.scorers = {name: ListStateScorer(s) for name, s in scorers.items()}
        self.weights = weights
        self.beam, self.vocab, self.sos, self.eos = beam_size, vocab_size, sos, eos
        self.pre_beam = int(pre_beam_ratio * beam_size)
        self.do_pre_beam = (pre_beam_score_key is not None and self.pre_beam < vocab_size
                            and ctc is not None)
        self.nbest, self.normalize_length = nbest, normalize_length
        self.token_list = token_list
        self.full_names = (["decoder"] if decoder is not None else []) + list(scorers)

    @torch.inference_mode()
    def __call__(self, xs: torch.Tensor, lengths: torch.Tensor, maxlenratio: float = 0.0,
                 minlenratio: float = 0.0,
                 ctc_input: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                 ) -> List[List[Hypothesis]]:
        """The n-best of each utterance of ``xs`` (utterances, frames, size) of ``lengths``;
        CTC scores ``ctc_input`` (frames and lengths of the same utterances) where given (an
        encoder whose CTC reads another output than the decoder, ``ctc_dechunked``)."""
        ctc_input = (xs, lengths) if ctc_input is None else ctc_input
        results = self._search(xs, lengths, maxlenratio, minlenratio, ctc_input)
        retry = [b for b, nbest in enumerate(results) if not nbest]
        if retry and minlenratio >= 0.1:  # ESPnet's rule: again with a smaller minlenratio
            logger.warning(f"no N-best results for utterances {retry} of the batch; decoding "
                           "them again with a smaller minlenratio")
            index = torch.tensor(retry, device=xs.device)
            again = self(xs[index], lengths[index.to(lengths.device)], maxlenratio,
                         max(0.0, minlenratio - 0.1),
                         (ctc_input[0][index], ctc_input[1][index.to(ctc_input[1].device)]))
            for b, nbest in zip(retry, again):
                results[b] = nbest
        return results

    def _bounds(self, lengths: List[int], maxlenratio: float, minlenratio: float):
        if maxlenratio == 0:
            maxlens = list(lengths)
        elif maxlenratio < 0:
            maxlens = [-int(maxlenratio)] * len(lengths)
        else:
            maxlens = [max(1, int(maxlenratio * n)) for n in lengths]
        minlens = [-int(minlenratio) if minlenratio < 0 else int(minlenratio * n)
                   for n in lengths]
        return maxlens, minlens

    def _search(self, xs: torch.Tensor, lengths: torch.Tensor, maxlenratio: float,
                minlenratio: float, ctc_input: Tuple[torch.Tensor, torch.Tensor]
                ) -> List[List[Hypothesis]]:
        n_utts, beam, vocab, device = xs.size(0), self.beam, self.vocab, xs.device
        maxlens, minlens = self._bounds(lengths.tolist(), maxlenratio, minlenratio)
        ended: List[List[Hypothesis]] = [[] for _ in range(n_utts)]
        utts = list(range(n_utts))  # original index of each utterance still in the batch
        n_hyps = n_utts * beam
        yseq = torch.full((n_hyps, 1), self.sos, dtype=torch.long, device=device)
        score = torch.zeros(n_hyps, dtype=xs.dtype, device=device)
        names = self.full_names + (["ctc"] if self.ctc is not None else [])
        parts = {k: torch.zeros(n_hyps, dtype=xs.dtype, device=device) for k in names}
        # At first an utterance has one hypothesis: its other rows would repeat it.
        active = torch.zeros(n_hyps, dtype=torch.bool, device=device)
        active[::beam] = True
        decoder_state = None if self.decoder is None else self.decoder.start_beams(xs, lengths)
        ctc = None if self.ctc is None else CTCPrefixScores(
            frame_posteriors(self.ctc, *ctc_input, blank=0, candidates_only=self.do_pre_beam),
            beam, self.eos, xs.dtype)
        for scorer in self.scorers.values():
            scorer.start(n_hyps)
        like = xs.new_empty(n_hyps, 0, xs.size(-1))

        for i in range(max(maxlens)):
            n_hyps = len(utts) * beam
            scores = {}
            if decoder_state is not None:
                new = yseq if decoder_state.length == 0 else yseq[:, -1:]
                scores["decoder"] = self.decoder.step_beams(new, decoder_state)
            for name, scorer in self.scorers.items():
                scores[name] = scorer.step(yseq, like[:n_hyps])
            weighted = torch.zeros(n_hyps, vocab, dtype=xs.dtype, device=device)
            for name in self.full_names:
                weighted += self.weights[name] * scores[name]
            if ctc is not None:
                candidates = weighted.topk(self.pre_beam, dim=-1)[1] if self.do_pre_beam else None
                scores["ctc"] = ctc.score(yseq[:, -1], yseq.size(1) - 1, candidates)
                weighted += self.weights["ctc"] * scores["ctc"]
            weighted += score[:, None]
            weighted.masked_fill_(~active[:, None], float("-inf"))

            # Pruning, per utterance, over its rows' expansions.
            top_scores, top = weighted.view(len(utts), beam * vocab).topk(beam, dim=-1)
            offsets = torch.arange(len(utts), device=device)[:, None] * beam
            rows = (top // vocab + offsets).view(-1)
            tokens = (top % vocab).view(-1)
            score = top_scores.view(-1)
            parts = {k: parts[k][rows] + scores[k][rows, tokens] for k in names}
            yseq = torch.cat((yseq[rows], tokens[:, None]), 1)

            # Which hypotheses end, and which utterances are done.
            at_eos = (tokens == self.eos).tolist()
            keep, active_list = [], []
            for b, utt in enumerate(utts):
                lo, hi = b * beam, (b + 1) * beam
                last_step = i == maxlens[utt] - 1
                for j in range(lo, hi):
                    if last_step or at_eos[j]:
                        if i >= minlens[utt]:
                            ended[utt].append(self._hypothesis(yseq[j], score[j], parts, j,
                                                               append_eos=last_step))
                        active_list.append(False)
                    else:
                        active_list.append(True)
                alive = any(active_list[lo:hi])
                if last_step or not alive:
                    continue
                if maxlenratio == 0.0 and end_detect(
                        [h.asdict() for h in ended[utt]], i):
                    continue
                keep.append(b)
            if not keep:
                break
            active = torch.tensor(active_list, dtype=torch.bool, device=device)
            self._select(rows, tokens, keep, len(utts), decoder_state, ctc)
            if len(keep) < len(utts):
                kept_rows = (torch.tensor(keep, device=device)[:, None] * beam
                             + torch.arange(beam, device=device)).view(-1)
                yseq, score, active = yseq[kept_rows], score[kept_rows], active[kept_rows]
                parts = {k: v[kept_rows] for k, v in parts.items()}
                utts = [utts[b] for b in keep]
        return [self._nbest(hyps) for hyps in ended]

    def _select(self, rows: torch.Tensor, tokens: torch.Tensor, keep: List[int], n_utts: int,
                decoder_state: Optional[BeamState], ctc: Optional[CTCPrefixScores]) -> None:
        """Reorder every scorer's state to the pruned hypotheses ``rows``, of the utterances
        ``keep`` only."""
        utterances = None
        if len(keep) < n_utts:
            utterances = torch.tensor(keep, device=rows.device)
            kept = (utterances[:, None] * self.beam
                    + torch.arange(self.beam, device=rows.device)).view(-1)
            rows, tokens = rows[kept], tokens[kept]
        if decoder_state is not None:
            decoder_state.select(rows, utterances)
        if ctc is not None:
            ctc.select(rows, tokens, utterances)
        row_list = rows.tolist()
        for scorer in self.scorers.values():
            scorer.select(row_list)

    def _hypothesis(self, yseq: torch.Tensor, score: torch.Tensor,
                    parts: Dict[str, torch.Tensor], row: int, append_eos: bool) -> Hypothesis:
        if append_eos:  # the last step: ESPnet ends every running hypothesis, ended or not
            yseq = torch.cat((yseq, yseq.new_tensor([self.eos])))
        return Hypothesis(yseq=yseq, score=score, scores={k: v[row] for k, v in parts.items()},
                          states={}, hs=[])

    def _nbest(self, hyps: List[Hypothesis]) -> List[Hypothesis]:
        if self.normalize_length:
            key = lambda h: h.score / (len(h.yseq) - 1)  # noqa: E731
        else:
            key = lambda h: h.score  # noqa: E731
        return sorted(hyps, key=key, reverse=True)[: self.nbest]
