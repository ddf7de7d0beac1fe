"""ESPnet-style encoder tests for the plugin's encoders: shapes and lengths against ESPnet's own
Conformer, every input layer, backward, intermediate CTC, padding invariance, clear errors."""

import pytest
import torch
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_plugin.compat import TooShortUttError
from espnet_plugin.nets.encoders import BranchformerXEncoder, ConformerXEncoder, ConMambaEncoder

IDIM = 20
SMALL = dict(output_size=16, num_blocks=2)
ENCODERS = {
    "conmamba_shared": lambda **kw: ConMambaEncoder(
        IDIM, linear_units=32, cnn_module_kernel=5, mamba_conf={"bidirectional": "shared", "d_state": 4}, **SMALL, **kw),
    "conmamba_concat": lambda **kw: ConMambaEncoder(
        IDIM, linear_units=32, cnn_module_kernel=5, mamba_conf={"bidirectional": "concat", "d_state": 4}, **SMALL, **kw),
    "conformer_x_mha": lambda **kw: ConformerXEncoder(
        IDIM, attention_heads=2, linear_units=32, cnn_module_kernel=5, **SMALL, **kw),
    "conformer_x_gqa": lambda **kw: ConformerXEncoder(
        IDIM, attention_heads=4, attention_type="gqa", attention_conf={"n_kv_heads": 2},
        linear_units=32, cnn_module_kernel=5, **SMALL, **kw),
    "conformer_x_mla": lambda **kw: ConformerXEncoder(
        IDIM, attention_heads=2, attention_type="mla", attention_conf={"kv_latent_dim": 8, "rope_dim": 4},
        linear_units=32, cnn_module_kernel=5, **SMALL, **kw),
    "conformer_x_linear": lambda **kw: ConformerXEncoder(
        IDIM, attention_heads=2, attention_type="linear", linear_units=32, cnn_module_kernel=5, **SMALL, **kw),
    "branchformer_x_mha": lambda **kw: BranchformerXEncoder(
        IDIM, attention_heads=2, cgmlp_linear_units=32, cgmlp_conv_kernel=5, **SMALL, **kw),
    "branchformer_x_linear": lambda **kw: BranchformerXEncoder(
        IDIM, attention_heads=2, attention_type="linear", cgmlp_linear_units=32, cgmlp_conv_kernel=5, **SMALL, **kw),
}


@pytest.fixture(params=sorted(ENCODERS))
def make_encoder(request):
    return ENCODERS[request.param]


@pytest.mark.parametrize("input_layer", ["conv2d", "conv2d2", "conv2d6", "conv2d8", "linear"])
def test_output_lengths_match_espnet_conformer_on_each_utterance(input_layer):
    """Lengths equal what ESPnet's own Conformer outputs for each utterance on its own (inside a
    batch ESPnet's mask-slicing over-counts short utterances by up to two frames; we do not)."""
    torch.manual_seed(0)
    ilens = torch.tensor([60, 47, 33])
    xs = torch.randn(3, 60, IDIM)
    ours = ENCODERS["conmamba_shared"](input_layer=input_layer)
    reference = ConformerEncoder(IDIM, output_size=16, attention_heads=2, linear_units=32, num_blocks=1,
                                 input_layer=input_layer)
    out, olens, _ = ours(xs, ilens)
    for i, length in enumerate(ilens.tolist()):
        alone, _, _ = reference(xs[i : i + 1, :length], ilens[i : i + 1])
        assert olens[i] == alone.size(1)
    assert out.shape == (3, olens.max(), 16)


def test_forward_backward_reaches_every_block_parameter(make_encoder):
    torch.manual_seed(0)
    encoder = make_encoder()
    xs, ilens = torch.randn(2, 40, IDIM), torch.tensor([40, 25])
    out, olens, _ = encoder(xs, ilens)
    assert out.shape == (2, olens.max(), 16)
    out.sum().backward()
    for name, param in encoder.blocks.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_an_utterance_alone_equals_it_inside_a_padded_batch(make_encoder):
    torch.manual_seed(0)
    encoder = make_encoder().eval()
    long, short = torch.randn(1, 64, IDIM), torch.randn(1, 37, IDIM)
    batch = torch.zeros(2, 64, IDIM)
    batch[0], batch[1, :37] = long[0], short[0]
    batch[1, 37:] = 100.0  # garbage in the padding must not matter
    with torch.no_grad():
        out, olens, _ = encoder(batch, torch.tensor([64, 37]))
        alone, alone_lens, _ = encoder(short, torch.tensor([37]))
    assert olens[1] == alone_lens[0]
    torch.testing.assert_close(out[1, : olens[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_bidirectional_encoders_see_the_future(make_encoder):
    torch.manual_seed(0)
    encoder = make_encoder().eval()
    xs = torch.randn(1, 64, IDIM)
    changed = xs.clone()
    changed[0, -8:] += 1.0
    with torch.no_grad():
        a = encoder(xs, torch.tensor([64]))[0]
        b = encoder(changed, torch.tensor([64]))[0]
    assert not torch.allclose(a[0, 0], b[0, 0]), "the first frame depends on the last ones"


def test_intermediate_ctc_outputs_like_espnet():
    encoder = ENCODERS["conformer_x_mha"](interctc_layer_idx=[1])
    (out, intermediate), olens, _ = encoder(torch.randn(2, 40, IDIM), torch.tensor([40, 30]))
    assert [index for index, _ in intermediate] == [1]
    assert intermediate[0][1].shape == out.shape


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown input_layer 'conv3d'"):
        ENCODERS["conmamba_shared"](input_layer="conv3d")
    with pytest.raises(ValueError, match="interctc_layer_idx"):
        ENCODERS["conmamba_shared"](interctc_layer_idx=[2])
    with pytest.raises(ValueError, match="unknown attention_type 'flash'"):
        ConformerXEncoder(IDIM, attention_type="flash", **SMALL)
    with pytest.raises(ValueError, match="cnn_module_kernel must be odd"):
        ConformerXEncoder(IDIM, cnn_module_kernel=4, **SMALL)


@pytest.mark.parametrize("option, message", [
    ({"output": "upsampled"}, "unknown dynamic_chunking output 'upsampled'"),
    ({"min_keep_ratio": 1.5}, "min_keep_ratio must be in"),
    ({"after_block": 2}, "after_block must lie in 1..1, got 2"),
    ({"target_ratio": 1.0}, "target_ratio must be in"),
])
def test_bad_dynamic_chunking_options_are_named(option, message):
    chunking = {"after_block": 1, **option}
    with pytest.raises(ValueError, match=message):
        ENCODERS["conmamba_shared"](dynamic_chunking=chunking)


def three_block_conmamba(**kw) -> ConMambaEncoder:
    return ConMambaEncoder(IDIM, output_size=16, num_blocks=3, linear_units=32, cnn_module_kernel=5,
                           mamba_conf={"d_state": 4}, input_layer="linear", **kw)


@pytest.mark.parametrize("output, layer", [("compressed", 1), ("dechunked", 2)])
def test_intermediate_ctc_at_another_frame_rate_than_the_output_is_refused(output, layer):
    chunking = {"after_block": 2, "output": output}
    with pytest.raises(ValueError, match=rf"interctc_layer_idx \[{layer}\] must lie"):
        three_block_conmamba(interctc_layer_idx=[layer], dynamic_chunking=chunking)


@pytest.mark.parametrize("output, layer", [("compressed", 2), ("dechunked", 1)])
def test_intermediate_ctc_with_chunking_has_the_output_frame_rate(output, layer):
    encoder = three_block_conmamba(
        interctc_layer_idx=[layer], dynamic_chunking={"after_block": 2, "output": output})
    ilens = torch.tensor([30, 21])
    (out, [(index, inter)]), olens, _ = encoder(torch.randn(2, 30, IDIM), ilens)
    assert index == layer and inter.shape == out.shape
    assert torch.equal(olens, ilens) == (output == "dechunked")


def test_too_short_input_raises_espnet_error():
    with pytest.raises(TooShortUttError):
        ENCODERS["conmamba_shared"]()(torch.randn(1, 5, IDIM), torch.tensor([5]))


@pytest.mark.parametrize("output", ["compressed", "dechunked"])
def test_the_encoder_output_alone_trains_the_router(output):
    """Without the ratio loss, the gradient of the encoder output reaches the router in both
    output modes: dechunking's confidence in one, the kept frames' straight-through confidence
    in the other. The straight-through factor is 1: switched off, the output is the same."""
    torch.manual_seed(0)
    chunking = {"after_block": 1, "target_ratio": 0.5, "output": output, "min_keep_ratio": 0.25}
    encoder = ENCODERS["conmamba_shared"](input_layer="linear", dynamic_chunking=chunking).eval()
    xs, ilens = torch.randn(2, 30, IDIM), torch.tensor([30, 21])
    out, olens, _ = encoder(xs, ilens)
    (out * torch.randn_like(out)).sum().backward()
    for proj in (encoder.chunking.q_proj, encoder.chunking.k_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    if output == "compressed":
        assert (olens < ilens).all()  # fewer frames than the linear input layer gives
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("espnet_plugin.nets.encoders.kept_confidence",
                          lambda state: torch.ones_like(state.kept_index, dtype=torch.float32))
            plain, _, _ = encoder(xs, ilens)
        torch.testing.assert_close(plain, out, rtol=0, atol=0)
