"""Every training config of every recipe builds through ESPnet's ASRTask, as stage 5 does, and
takes a training step with finite gradients in every encoder and decoder parameter: a misspelt
option or an unregistered class fails here, not minutes into a recipe run."""

import pytest
import torch

import espnet_plugin  # noqa: F401  (registers the classes the configs name)
from conftest import RECIPE_RATES, REPO, build_recipe_model

CONFIGS = sorted(
    {
        (recipe, path.resolve().relative_to(REPO))
        for recipe in RECIPE_RATES
        for path in (REPO / "egs2" / recipe / "asr1" / "conf").rglob("train_asr*.yaml")
    }
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_both_recipes_have_configs():
    assert {recipe for recipe, _ in CONFIGS} == set(RECIPE_RATES)


@pytest.mark.parametrize("recipe, config", CONFIGS, ids=[str(c) for _, c in CONFIGS])
def test_config_builds_and_trains_a_step(recipe, config, char_token_list):
    rate = RECIPE_RATES[recipe]
    _, model = build_recipe_model(REPO / config, rate, char_token_list)
    model.train()
    speech = torch.randn(2, 2 * rate)  # 2 s: 6 letters leave CTC room even at a compressed rate
    speech_lengths = torch.tensor([2 * rate, 3 * rate // 2])
    text = torch.randint(2, 28, (2, 6))
    text_lengths = torch.tensor([6, 4])
    loss, stats, _ = model(speech, speech_lengths, text, text_lengths)
    loss.backward()
    assert torch.isfinite(loss)
    assert stats["loss_att"] is not None and stats["loss_ctc"] is not None
    for part in (model.encoder, model.decoder):
        for name, param in part.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
