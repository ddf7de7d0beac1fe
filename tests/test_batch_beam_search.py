"""The batched beam search against ESPnet's own ``BatchBeamSearch`` run on each utterance alone:
the same n-best (tokens identical, scores within 1e-4) for every decoder of the project, inside
batches of any size, with CTC, a language model and the length bonus."""

import inspect
from unittest.mock import patch

import pytest
import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.lm.seq_rnn_lm import SequentialRNNLM

from espnet_plugin.compat import BatchBeamSearch, CTCPrefixScorer, nets_module
from espnet_plugin.decoding import ctc_prefix
from espnet_plugin.decoding.beam_search import BatchedBeamSearch
from espnet_plugin.decoding.ctc_prefix import (LOG_ZERO, PosteriorTable, ProjectedPosteriors,
                                               frame_posteriors)
from espnet_plugin.nets.transformer_decoder import CachedTransformerDecoder, cached_from_stock

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LengthBonus = nets_module("scorers.length_bonus").LengthBonus

VOCAB, SIZE, BEAM = 20, 32, 4
SOS = EOS = VOCAB - 1
DECODER = dict(vocab_size=VOCAB, encoder_output_size=SIZE, attention_heads=4, linear_units=48,
               num_blocks=2, dropout_rate=0.0, positional_dropout_rate=0.0)
VARIANTS = {
    "mha": dict(position="rotary"),
    "gqa": dict(position="rotary", self_attention_type="gqa",
                self_attention_conf={"n_kv_heads": 2}, src_attention_type="gqa",
                src_attention_conf={"n_kv_heads": 1}),
    "mla": dict(position="rotary", self_attention_type="mla",
                self_attention_conf={"kv_latent_dim": 16}, src_attention_type="mla",
                src_attention_conf={"kv_latent_dim": 16}),
    "linear": dict(position="rotary", self_attention_type="linear",
                   src_attention_type="linear"),
}
LENGTHS = [31, 9, 24, 17, 28]


def sharpened(module, factor=4.0):
    """A random model made confident, so that beams differ and hypotheses end."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and ("output_layer" in name or "ctc_lo" in name):
                p.mul_(factor)
    return module.eval()


def models(variant, seed=0, size=SIZE):
    torch.manual_seed(seed)
    conf = dict(DECODER, encoder_output_size=size)
    if variant == "stock":
        decoder = sharpened(TransformerDecoder(**conf, use_flash_attn=False))
    else:
        decoder = sharpened(CachedTransformerDecoder(**conf, **VARIANTS[variant]))
    ctc = sharpened(CTC(VOCAB, size))
    lm = SequentialRNNLM(VOCAB, unit=16, nlayers=1).eval()
    xs = torch.randn(len(LENGTHS), max(LENGTHS), size)
    return decoder, ctc, lm, xs


WEIGHTS = {"decoder": 0.5, "ctc": 0.5, "lm": 0.3, "length_bonus": 0.5}


def espnet_search(decoder, ctc, lm):
    return BatchBeamSearch(
        scorers={"decoder": decoder, "ctc": CTCPrefixScorer(ctc=ctc, eos=EOS), "lm": lm,
                 "length_bonus": LengthBonus(VOCAB)},
        weights=WEIGHTS, beam_size=BEAM, vocab_size=VOCAB, sos=SOS, eos=EOS,
        pre_beam_score_key="full",
    ).eval()


def ours(decoder, ctc, lm, nbest):
    if isinstance(decoder, TransformerDecoder):
        decoder = cached_from_stock(decoder, {k: v for k, v in DECODER.items()
                                              if k not in ("vocab_size", "encoder_output_size")},
                                    VOCAB, SIZE)
    return BatchedBeamSearch(decoder, ctc, {"lm": lm, "length_bonus": LengthBonus(VOCAB)},
                             WEIGHTS, BEAM, VOCAB, SOS, EOS, nbest=nbest)


def espnet_nbest(decoder, ctc, lm, xs, n, **ratios):
    """ESPnet's n-best of each utterance of ``xs`` decoded alone."""
    with torch.no_grad():
        return [espnet_search(decoder, ctc, lm)(xs[b, :length], **ratios)[:n]
                for b, length in enumerate(LENGTHS)]


def assert_same_nbest(found, expected):
    assert len(found) == len(expected) > 0
    for a, b in zip(found, expected):
        assert a.yseq.tolist() == b.yseq.tolist()
        torch.testing.assert_close(torch.as_tensor(a.score), torch.as_tensor(b.score),
                                   rtol=0, atol=1e-4)
        assert a.scores.keys() == b.scores.keys()
        for k in a.scores:
            torch.testing.assert_close(torch.as_tensor(a.scores[k]),
                                       torch.as_tensor(b.scores[k]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["stock", "mha", "gqa", "mla", "linear"])
@pytest.mark.parametrize("ratios", [dict(maxlenratio=0.0, minlenratio=0.0),
                                    dict(maxlenratio=0.6, minlenratio=0.3)])
def test_every_utterance_of_a_batch_gets_espnets_nbest_alone(variant, ratios):
    decoder, ctc, lm, xs = models(variant)
    lengths = torch.tensor(LENGTHS)
    expected = espnet_nbest(decoder, ctc, lm, xs, 3, **ratios)
    search = ours(decoder, ctc, lm, 3)
    batched = search(xs, lengths, **ratios)
    assert max(len(e[0].yseq) for e in expected) > 4  # real searches, not an immediate <eos>
    for b in range(len(LENGTHS)):
        assert_same_nbest(batched[b], expected[b])
    for size in (1, 2):  # the same in other batches
        for start in range(0, len(LENGTHS), size):
            part = search(xs[start:start + size], lengths[start:start + size], **ratios)
            for b, nbest in enumerate(part, start):
                assert_same_nbest(nbest, expected[b])



def test_prefixes_longer_than_their_utterance_decode_alike_alone_and_in_a_batch():
    """maxlenratio 1.5 and minlenratio 1.1 make hypotheses outgrow their frames, where CTC keeps
    no frame of them (ESPnet's own scorer fails there with an IndexError): each utterance still
    gets the n-best it gets alone, in a batch whose other utterances are longer."""
    decoder, ctc, lm, xs = models("mha")
    lengths = torch.tensor(LENGTHS)
    ratios = dict(maxlenratio=1.5, minlenratio=1.1)
    search = ours(decoder, ctc, lm, 3)
    batched = search(xs, lengths, **ratios)
    assert any(len(nbest[0].yseq) > n + 2 for nbest, n in zip(batched, LENGTHS))
    for b, n in enumerate(LENGTHS):
        assert_same_nbest(search(xs[b:b + 1, :n], lengths[b:b + 1], **ratios)[0], batched[b])

def test_ctc_only_and_attention_only_searches_match_espnet():
    decoder, ctc, lm, xs = models("mha", seed=1)
    for weights in ({"decoder": 0.0, "ctc": 1.0}, {"decoder": 1.0, "ctc": 0.0}):
        scorers = {"decoder": decoder, "ctc": CTCPrefixScorer(ctc=ctc, eos=EOS)}
        search = BatchBeamSearch(scorers=scorers, weights=weights, beam_size=BEAM,
                                 vocab_size=VOCAB, sos=SOS, eos=EOS,
                                 pre_beam_score_key=None if weights["ctc"] == 1 else "full")
        with torch.no_grad():
            expected = [search.eval()(xs[b, :n], maxlenratio=0.5) for b, n in enumerate(LENGTHS)]
        batched = BatchedBeamSearch(
            decoder if weights["decoder"] else None, ctc if weights["ctc"] else None, {},
            weights, BEAM, VOCAB, SOS, EOS, nbest=BEAM,
            pre_beam_score_key=None if weights["ctc"] == 1 else "full",
        )(xs, torch.tensor(LENGTHS), maxlenratio=0.5)
        for b in range(len(LENGTHS)):
            assert_same_nbest(batched[b], expected[b])


UTTERANCE_BATCHING = "x_lengths" in inspect.signature(BatchBeamSearch.forward).parameters


@pytest.mark.skipif(not UTTERANCE_BATCHING,
                    reason="this espnet's BatchBeamSearch decodes one utterance at a time")
@pytest.mark.parametrize("variant", ["mha", "mla", "linear"])
def test_espnet_202611_batched_search_with_the_cached_decoder_gives_batch_ones_results(variant):
    decoder, ctc, lm, xs = models(variant, seed=2)
    search = espnet_search(decoder, ctc, lm)
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        expected = [search(xs[b, :n], maxlenratio=0.5)[:2] for b, n in enumerate(LENGTHS)]
        batched = search(xs, x_lengths=lengths, maxlenratio=0.5)
    for b in range(len(LENGTHS)):
        assert_same_nbest(batched[b][:2], expected[b])


def test_projected_posteriors_are_ctcs_log_softmax_column_by_column():
    """A vocabulary larger than the encoder output is read from CTC's projection, never as a
    table: its columns are ESPnet's ``log_softmax`` (float32) of those tokens, padded frames
    emitting blank only."""
    torch.manual_seed(3)
    ctc = sharpened(CTC(VOCAB, 8))
    xs, lengths = torch.randn(3, 11, 8), torch.tensor([11, 4, 7])
    posteriors = frame_posteriors(ctc, xs, lengths, blank=0, candidates_only=True)
    assert isinstance(posteriors, ProjectedPosteriors)
    tokens = torch.tensor([[0, 5, 19], [3, 0, 3], [7, 8, 9]])
    columns = posteriors.columns(tokens)
    table = PosteriorTable(ctc.log_softmax(xs), lengths, blank=0).columns(tokens)
    assert columns.dtype == torch.float64 and columns.shape == (11, 3, 3)
    torch.testing.assert_close(columns, table, rtol=0, atol=1e-5)
    expected = ctc.log_softmax(xs)[1, :4, 3].double()
    torch.testing.assert_close(columns[:4, 1, 0], expected, rtol=0, atol=1e-5)
    assert columns[4:, 1, 1].eq(0.0).all() and columns[4:, 1, 0].eq(LOG_ZERO).all()
    # Without a pre-beam every token is scored each step: the table is kept.
    assert isinstance(frame_posteriors(ctc, xs, lengths, 0, candidates_only=False), PosteriorTable)


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_a_vocabulary_larger_than_the_encoder_output_gets_espnets_nbest(variant):
    decoder, ctc, lm, xs = models(variant, seed=4, size=16)  # < VOCAB
    expected = espnet_nbest(decoder, ctc, lm, xs, 3)
    search = ours(decoder, ctc, lm, 3)
    built = []
    with patch.object(ctc_prefix, "ProjectedPosteriors",
                      side_effect=lambda *a: built.append(ProjectedPosteriors(*a)) or built[-1]):
        batched = search(xs, torch.tensor(LENGTHS))
    assert built and max(len(e[0].yseq) for e in expected) > 4
    for b in range(len(LENGTHS)):
        assert_same_nbest(batched[b], expected[b])


def test_a_confident_ctc_is_scored_on_a_window_of_frames_with_espnets_nbest():
    """A sure CTC puts a prefix's paths on a few frames: the scorer holds those (a window of
    them, not the utterance), and long utterances still get ESPnet's n-best."""
    decoder, ctc, lm, _ = models("mha", seed=5)
    sharpened(ctc, factor=4.0)  # 16 times the random model's confidence in all
    lengths = [150, 110]
    torch.manual_seed(5)
    xs = torch.randn(len(lengths), max(lengths), SIZE)
    held = []
    extend = ctc_prefix.CTCPrefixScores._extend

    def recording(scorer, *args):
        extend(scorer, *args)
        held.append(scorer.r.size(0))

    with torch.no_grad():
        expected = [espnet_search(decoder, ctc, lm)(xs[b, :n], maxlenratio=0.2)[:2]
                    for b, n in enumerate(lengths)]
    with patch.object(ctc_prefix.CTCPrefixScores, "_extend", recording):
        batched = ours(decoder, ctc, lm, 2)(xs, torch.tensor(lengths), maxlenratio=0.2)
    assert max(held[5:]) < min(lengths) // 3
    for b in range(len(lengths)):
        assert_same_nbest(batched[b], expected[b])


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_a_decoder_trains_after_a_search_under_inference_mode(variant):
    """The search runs under ``torch.inference_mode``; what the decoder keeps from it (rotary
    tables, MLA's folded projections) must still serve a training step and an evaluation with
    gradients afterwards."""
    decoder, ctc, lm, xs = models(variant, seed=6)
    ours(decoder, ctc, lm, 1)(xs, torch.tensor(LENGTHS), maxlenratio=0.3)
    tokens = torch.randint(1, VOCAB - 1, (2, 5))
    for training in (True, False):
        decoder.train(training)
        out = decoder(xs[:2], torch.tensor(LENGTHS[:2]), tokens, torch.tensor([5, 4]))[0]
        out.sum().backward()
        assert all(p.grad is not None for p in decoder.parameters() if p.requires_grad)
        decoder.zero_grad()
