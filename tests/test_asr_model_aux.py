"""``model: espnet_aux`` against ESPnet's own ``ESPnetASRModel`` sharing the same modules."""

import pytest
import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.asr.encoder.abs_encoder import AbsEncoder
from espnet2.asr.encoder.transformer_encoder import TransformerEncoder
from espnet2.asr.espnet_model import ESPnetASRModel

from espnet_plugin.asr_model import ESPnetAuxLossASRModel
from espnet_plugin.nets.aux_loss import AuxLossMixin, collect_aux
from espnet_plugin.nets.dynamic_chunking import DynamicChunking

TOKENS = ["<blank>", "a", "b", "c", "<sos/eos>"]
INPUT_SIZE, D_MODEL = 6, 8
RATIO_WEIGHT, ACTIVITY_WEIGHT = 0.5, 0.1


class ChunkingEncoder(AuxLossMixin, AbsEncoder):
    """Projection, then a linear layer on the dynamically chunked frames, back at full rate.

    Besides its chunking layer's ratio loss it reports one loss of its own, a penalty on the
    output's mean square, so that the model has two aux-loss layers at different depths.
    """

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(INPUT_SIZE, D_MODEL)
        self.chunking = DynamicChunking(D_MODEL, ratio_loss_weight=RATIO_WEIGHT)
        self.inner = torch.nn.Linear(D_MODEL, D_MODEL)

    def output_size(self) -> int:
        return D_MODEL

    def forward(self, xs_pad, ilens, prev_states=None):
        x_chunked, _, state = self.chunking.chunk(self.proj(xs_pad), ilens)
        out = self.chunking.dechunk(self.inner(x_chunked), state)
        activity = out[state.valid].pow(2).mean()
        self.report_aux({"activity": ACTIVITY_WEIGHT * activity}, {"activity": activity})
        return out, ilens, None


def model_parts(encoder: AbsEncoder) -> dict:
    torch.manual_seed(0)
    return dict(
        vocab_size=len(TOKENS),
        token_list=TOKENS,
        frontend=None,
        specaug=None,
        normalize=None,
        preencoder=None,
        encoder=encoder,
        postencoder=None,
        decoder=TransformerDecoder(
            len(TOKENS),
            D_MODEL,
            attention_heads=2,
            linear_units=16,
            num_blocks=1,
            dropout_rate=0.0,
            positional_dropout_rate=0.0,
        ),
        ctc=CTC(len(TOKENS), D_MODEL),
        joint_network=None,
        ctc_weight=0.3,
    )


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return dict(
        speech=torch.randn(2, 12, INPUT_SIZE, generator=gen),
        speech_lengths=torch.tensor([12, 9]),
        text=torch.tensor([[1, 2, 3, 1], [3, 3, 2, -1]]),
        text_lengths=torch.tensor([4, 3]),
    )


def espnet_and_aux_models(encoder: AbsEncoder):
    """ESPnet's model and ours on the very same modules (eval: deterministic)."""
    parts = model_parts(encoder)
    return ESPnetASRModel(**parts).eval(), ESPnetAuxLossASRModel(**parts).eval()


def expected_aux(encoder: ChunkingEncoder, data: dict) -> dict[str, torch.Tensor]:
    """The encoder's aux values, computed here from its parts, unweighted."""
    _, _, state = encoder.chunking.chunk(encoder.proj(data["speech"]), data["speech_lengths"])
    out, _, _ = encoder(data["speech"], data["speech_lengths"])
    lengths = data["speech_lengths"]
    valid = torch.arange(data["speech"].size(1)) < lengths[:, None]
    return {
        "ratio": encoder.chunking.ratio_loss(state),
        "compression": state.kept.sum() / lengths.sum(),
        "boundaries": state.boundary.sum() / lengths.sum(),
        "activity": out[valid].pow(2).mean(),
    }


def weighted_sum(aux: dict[str, torch.Tensor]) -> torch.Tensor:
    return RATIO_WEIGHT * aux["ratio"] + ACTIVITY_WEIGHT * aux["activity"]


# ESPnet's loss sums over each utterance's tokens, so aux losses count once per token:
# batch() has 4 and 3 tokens.
MEAN_TOKENS = 3.5


def test_loss_adds_the_weighted_aux_losses_and_stats_report_them():
    encoder = ChunkingEncoder()
    espnet, ours = espnet_and_aux_models(encoder)
    data = batch()
    expected = expected_aux(encoder, data)
    espnet_loss, espnet_stats, _ = espnet(**data)
    loss, stats, weight = ours(**data)

    torch.testing.assert_close(loss, espnet_loss + MEAN_TOKENS * weighted_sum(expected))
    assert loss.requires_grad and loss.shape == (1,)
    assert torch.equal(stats["loss"], loss.detach())
    torch.testing.assert_close(stats["encoder.chunking.ratio_loss"], expected["ratio"][None])
    compression = stats["encoder.chunking.compression"]
    torch.testing.assert_close(compression, expected["compression"][None])
    boundaries = stats["encoder.chunking.boundary_ratio"]
    torch.testing.assert_close(boundaries, expected["boundaries"][None])
    torch.testing.assert_close(stats["encoder.activity"], expected["activity"][None])
    for name, value in espnet_stats.items():
        if name != "loss" and value is not None:
            torch.testing.assert_close(stats[name], value)
    assert all(v is None or v.shape == (1,) for v in stats.values())  # DataParallel-gatherable
    assert weight.tolist() == [2]


def test_aux_loss_gradient_reaches_the_router():
    encoder = ChunkingEncoder()
    espnet, ours = espnet_and_aux_models(encoder)
    data = batch()
    router = encoder.chunking.q_proj.weight

    def grad_of(loss):
        (grad,) = torch.autograd.grad(loss.sum(), router)
        return grad

    aux = expected_aux(encoder, data)
    aux_grad = grad_of(weighted_sum(aux))
    assert aux_grad.abs().sum() > 0
    torch.testing.assert_close(grad_of(ours(**data)[0]), grad_of(espnet(**data)[0]) + MEAN_TOKENS * aux_grad)


def test_a_length_normalized_loss_adds_the_aux_losses_once():
    encoder = ChunkingEncoder()
    parts = model_parts(encoder)
    espnet = ESPnetASRModel(**parts, length_normalized_loss=True).eval()
    ours = ESPnetAuxLossASRModel(**parts, length_normalized_loss=True).eval()
    data = batch()
    expected = expected_aux(encoder, data)
    torch.testing.assert_close(ours(**data)[0], espnet(**data)[0] + weighted_sum(expected))


def test_records_from_outside_the_forward_pass_are_dropped():
    encoder = ChunkingEncoder()
    espnet, ours = espnet_and_aux_models(encoder)
    ours.stray = DynamicChunking(D_MODEL)  # e.g. a layer only run while decoding
    ours.stray.chunk(torch.randn(1, 5, D_MODEL), torch.tensor([5]))
    data = batch()
    expected = expected_aux(encoder, data)
    loss, stats, _ = ours(**data)
    assert not any(name.startswith("stray.") for name in stats)
    torch.testing.assert_close(loss, espnet(**data)[0] + MEAN_TOKENS * weighted_sum(expected))


def test_without_aux_layers_it_is_espnet_model():
    encoder = TransformerEncoder(
        INPUT_SIZE,
        output_size=D_MODEL,
        attention_heads=2,
        linear_units=16,
        num_blocks=1,
        dropout_rate=0.0,
        positional_dropout_rate=0.0,
        attention_dropout_rate=0.0,
        input_layer="linear",
    )
    espnet, ours = espnet_and_aux_models(encoder)
    data = batch()
    espnet_loss, espnet_stats, espnet_weight = espnet(**data)
    loss, stats, weight = ours(**data)
    assert torch.equal(loss, espnet_loss) and torch.equal(weight, espnet_weight)
    assert stats.keys() == espnet_stats.keys()


def test_registered_as_model_espnet_aux():
    import espnet_plugin  # noqa: F401  (registers)
    from espnet2.tasks.asr import model_choices

    assert model_choices.get_class("espnet_aux") is ESPnetAuxLossASRModel


def test_collect_aux_names_records_by_module_path():
    model = torch.nn.ModuleDict({"a": DynamicChunking(4), "b": torch.nn.ModuleDict()})
    model["b"]["c"] = DynamicChunking(4)
    x = torch.randn(1, 6, 4)
    for layer in (model["a"], model["b"]["c"]):
        layer.chunk(x, torch.tensor([6]))
    report = collect_aux(model)
    assert sorted(report.losses) == ["a.ratio_loss", "b.c.ratio_loss"]
    assert sorted(report.stats) == [
        "a.boundary_ratio",
        "a.compression",
        "a.ratio_loss",
        "b.c.boundary_ratio",
        "b.c.compression",
        "b.c.ratio_loss",
    ]
    assert collect_aux(model).stats == {}


@pytest.mark.parametrize("count", [1, 2])
def test_a_second_report_replaces_the_first(count):
    layer = DynamicChunking(4)
    x = torch.randn(1, 6, 4)
    states = [layer.chunk(x[:, : 6 - i], torch.tensor([6 - i]))[2] for i in range(count)]
    (loss,) = collect_aux(layer).losses.values()
    torch.testing.assert_close(loss, layer.ratio_loss_weight * layer.ratio_loss(states[-1]))
