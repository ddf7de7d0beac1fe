"""The cached decoder against ESPnet's own TransformerDecoder, its own full recomputation, and a
real BatchBeamSearch with ESPnet's CTC prefix scorer and a language model."""

import pytest
import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.lm.seq_rnn_lm import SequentialRNNLM

from espnet_plugin.compat import BatchBeamSearch, CTCPrefixScorer
from espnet_plugin.nets.transformer_decoder import CachedTransformerDecoder

VOCAB, SIZE = 24, 32
SOS = EOS = VOCAB - 1
SIZES = dict(
    vocab_size=VOCAB,
    encoder_output_size=SIZE,
    attention_heads=4,
    linear_units=48,
    num_blocks=2,
    dropout_rate=0.0,
    positional_dropout_rate=0.0,
)
VARIANTS = {
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "mla": {"kv_latent_dim": 16},
    "linear": {},
}


def stock_and_ours(seed=0, **options):
    torch.manual_seed(seed)
    stock = TransformerDecoder(**SIZES, use_flash_attn=False, **options).eval()
    ours = CachedTransformerDecoder(**SIZES, **options).eval()
    ours.load_state_dict(stock.state_dict())  # strict: same names, nothing missing or extra
    return stock, ours


def encoder_batch():
    hs_pad = torch.randn(3, 17, SIZE)
    hlens = torch.tensor([17, 11, 6])
    ys = torch.randint(0, VOCAB - 1, (3, 7))
    ylens = torch.tensor([7, 5, 2])
    return hs_pad, hlens, ys, ylens


@pytest.mark.parametrize("normalize_before, concat_after", [(True, False), (False, True)])
def test_forward_equals_stock_decoder_on_its_weights(normalize_before, concat_after):
    stock, ours = stock_and_ours(normalize_before=normalize_before, concat_after=concat_after)
    hs_pad, hlens, ys, ylens = encoder_batch()
    expected, _ = stock(hs_pad, hlens, ys, ylens)
    (logits, hidden), olens = ours(hs_pad, hlens, ys, ylens, return_hs=True)
    valid = torch.arange(ys.size(1))[None] < ylens[:, None]  # padded positions are not scored
    torch.testing.assert_close(logits[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(olens, ylens)
    if ours.output_layer is not None:
        torch.testing.assert_close(ours.output_layer(hidden), logits)


def test_training_loss_and_gradients_equal_stock_decoder():
    stock, ours = stock_and_ours()
    hs_pad, hlens, ys, ylens = encoder_batch()
    targets = ys.masked_fill(torch.arange(ys.size(1))[None] >= ylens[:, None], -1)
    grads = []
    for decoder in (stock, ours):
        decoder.train()
        logits, _ = decoder(hs_pad, hlens, ys, ylens)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1)
        decoder.zero_grad()
        loss.backward()
        grads.append((loss, {n: p.grad for n, p in decoder.named_parameters()}))
    (stock_loss, stock_grads), (our_loss, our_grads) = grads
    torch.testing.assert_close(our_loss, stock_loss, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == stock_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, stock_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_batch_score_equals_stock_decoder_through_beam_reordering():
    stock, ours = stock_and_ours()
    x = torch.randn(13, SIZE)
    ys = torch.full((1, 1), SOS)
    stock_states, our_states = [None], [ours.init_state(x)]
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        n = ys.size(0)
        expected, stock_states = stock.batch_score(ys, stock_states, x.expand(n, -1, -1))
        logp, our_states = ours.batch_score(ys, our_states, x.expand(n, -1, -1))
        torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
        # Beam-like selection: hypotheses are kept, repeated and reordered.
        keep = torch.randint(0, n, (3,), generator=generator).tolist()
        stock_states = [stock.select_state(stock_states, i) for i in keep]
        our_states = [ours.select_state(our_states, i) for i in keep]
        ys = torch.cat((ys[keep], torch.randint(0, EOS, (3, 1), generator=generator)), 1)


@pytest.mark.parametrize("position", ["absolute", "rotary"])
@pytest.mark.parametrize("self_type, src_type", [(t, t) for t in VARIANTS] + [("mla", "gqa")])
def test_cached_decoding_equals_full_recomputation(position, self_type, src_type):
    torch.manual_seed(0)
    options = dict(
        position=position,
        self_attention_type=self_type,
        self_attention_conf=VARIANTS[self_type],
        src_attention_type=src_type,
        src_attention_conf=VARIANTS[src_type],
    )
    decoder = CachedTransformerDecoder(**SIZES, **options).eval()
    x = torch.randn(15, SIZE)
    ys = torch.cat((torch.tensor([[SOS], [SOS]]), torch.randint(0, EOS, (2, 6))), 1)
    full, _ = decoder(x.expand(2, -1, -1), torch.tensor([15, 15]), ys, torch.tensor([7, 7]))
    states = [decoder.init_state(x)] * 2
    for t in range(1, ys.size(1) + 1):
        logp, states = decoder.batch_score(ys[:, :t], states, x.expand(2, -1, -1))
        torch.testing.assert_close(logp, full[:, t - 1].log_softmax(-1), rtol=1e-5, atol=1e-5)


def test_a_primer_of_several_tokens_is_run_in_one_step():
    torch.manual_seed(0)
    decoder = CachedTransformerDecoder(**SIZES, position="rotary", self_attention_type="linear")
    decoder.eval()
    x = torch.randn(9, SIZE)
    ys = torch.tensor([[SOS, 3, 5, 7]])
    logp, state = decoder.score(ys[0], decoder.init_state(x), x)
    full, _ = decoder(x[None], torch.tensor([9]), ys, torch.tensor([4]))
    torch.testing.assert_close(logp, full[0, -1].log_softmax(-1), rtol=1e-5, atol=1e-5)
    assert state.caches is not None


def beam_search(decoder, ctc, lm):
    search = BatchBeamSearch(
        scorers={"decoder": decoder, "ctc": CTCPrefixScorer(ctc=ctc, eos=EOS), "lm": lm},
        weights={"decoder": 0.7, "ctc": 0.3, "lm": 0.3},
        beam_size=4,
        vocab_size=VOCAB,
        sos=SOS,
        eos=EOS,
        pre_beam_score_key="full",
    ).eval()
    return search


def test_batch_beam_search_with_ctc_and_lm_finds_what_the_stock_decoder_finds():
    stock, ours = stock_and_ours(seed=3)
    ctc = CTC(VOCAB, SIZE).eval()
    lm = SequentialRNNLM(VOCAB, unit=16, nlayers=1).eval()
    with torch.no_grad():
        for decoder in (stock, ours):  # sharpen the random model so hypotheses differ clearly
            decoder.output_layer.weight.mul_(4.0)
        ctc.ctc_lo.weight.mul_(4.0)
    x = torch.randn(40, SIZE)
    with torch.no_grad():
        expected = beam_search(stock, ctc, lm)(x, maxlenratio=0.5, minlenratio=0.0)
        found = beam_search(ours, ctc, lm)(x, maxlenratio=0.5, minlenratio=0.0)
    assert len(found) == len(expected) > 0
    assert len(expected[0].yseq) > 3  # a real search, not an immediate <eos>
    for ours_hyp, stock_hyp in zip(found, expected):
        assert ours_hyp.yseq.tolist() == stock_hyp.yseq.tolist()
        torch.testing.assert_close(ours_hyp.score, stock_hyp.score, rtol=1e-5, atol=1e-4)


def test_registered_as_cached_transformer_decoder():
    import espnet_plugin  # noqa: F401  (registers)
    from espnet2.tasks.asr import decoder_choices

    cls = decoder_choices.get_class("cached_transformer")
    assert cls is CachedTransformerDecoder
    decoder = cls(
        vocab_size=10,
        encoder_output_size=16,
        num_blocks=1,
        self_attention_type="gqa",
        self_attention_conf={"n_kv_heads": 2},
        src_attention_type="mla",
        src_attention_conf={"kv_latent_dim": 8},
    )
    assert decoder.decoders[0].self_attn.n_kv_heads == 2
    assert decoder.decoders[0].src_attn.kv_latent_dim == 8


@pytest.mark.parametrize(
    "options, named",
    [
        ({"position": "relative"}, "position"),
        ({"input_layer": "linear"}, "input_layer"),
        ({"self_attention_conf": {"rotary": True}}, "self_attention_conf"),
        ({"src_attention_type": "sparse"}, "sparse"),
        ({"self_attention_type": "gqa", "self_attention_conf": {"n_kv": 2}}, "n_kv"),
    ],
)
def test_bad_configuration_is_named(options, named):
    with pytest.raises(ValueError, match=named):
        CachedTransformerDecoder(**SIZES, **options)
