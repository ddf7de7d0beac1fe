"""The attention-variant configs of both recipes: the committed files are the generator's output,
the variants differ in attention only, and MLA and GQA keep a quarter of MHA's decoder cache.
(test_recipe_configs trains a step of each.)"""

import itertools

import pytest
import yaml

import espnet_plugin  # noqa: F401  (registers conformer_x, branchformer_x, cached_transformer)
from conftest import RECIPE_RATES, REPO, build_recipe_model
from espnet_plugin.nets.attention import ATTENTION_TYPES
from espnet_plugin.recipe import attention_configs

LIBRISPEECH = REPO / "egs2/librispeech_100/asr1"
ASTERISK = REPO / "egs2/asterisk_en/asr1"
ENCODERS = ("conformer", "branchformer")
VARIANTS = ("mha", "mla", "gqa", "linear")
# recipe dir, file suffix
RECIPES = {"librispeech_100": (LIBRISPEECH, ""), "asterisk_en": (ASTERISK, "_small")}
CONFIGS = list(itertools.product(RECIPES, ENCODERS, VARIANTS))
ATTENTION_KEYS = {
    "encoder_conf": ("attention_type", "attention_conf"),
    "decoder_conf": (
        "self_attention_type",
        "self_attention_conf",
        "src_attention_type",
        "src_attention_conf",
    ),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config_path(recipe: str, encoder: str, variant: str):
    folder, suffix = RECIPES[recipe]
    return folder / "conf" / "tuning" / f"train_asr_{encoder}_{variant}{suffix}.yaml"


def load(recipe: str, encoder: str, variant: str) -> dict:
    return yaml.safe_load(config_path(recipe, encoder, variant).read_text())


def test_committed_configs_are_the_generated_ones():
    generated = attention_configs.configs(REPO / "egs2")
    assert sorted(generated) == sorted(config_path(*config) for config in CONFIGS)
    for path, text in generated.items():
        assert path.read_text() == text, f"{path} differs: run python -m {attention_configs.__name__}"


@pytest.mark.parametrize("recipe, encoder", list(itertools.product(RECIPES, ENCODERS)))
def test_variants_differ_in_attention_only(recipe, encoder):
    def without_attention(config: dict) -> dict:
        for section, keys in ATTENTION_KEYS.items():
            config[section] = {k: v for k, v in config[section].items() if k not in keys}
        return config

    configs = {variant: load(recipe, encoder, variant) for variant in VARIANTS}
    for variant, config in configs.items():
        assert config["encoder"] == f"{encoder}_x" and config["decoder"] == "cached_transformer"
        assert config["encoder_conf"]["attention_type"] == variant
        assert config["decoder_conf"]["self_attention_type"] == variant
    shared = [without_attention(config) for config in configs.values()]
    assert all(config == shared[0] for config in shared[1:])


def test_librispeech_variants_are_of_equal_size():
    for encoder, variant in itertools.product(ENCODERS, VARIANTS):
        config = load("librispeech_100", encoder, variant)
        assert config["encoder_conf"]["output_size"] == 256
        assert config["encoder_conf"]["num_blocks"] == 12
        assert config["decoder_conf"]["num_blocks"] == 6


def quarter_of_mha(attention_type: str, options: dict, d_model: int, heads: int) -> float:
    """Cache per token against MHA's 2 * d_model numbers, by hand from the YAML options."""
    if attention_type == "gqa":
        return options["n_kv_heads"] / heads
    if attention_type == "mla":
        return (options["kv_latent_dim"] + options.get("rope_dim", 0)) / (2 * d_model)
    assert attention_type == "mha"
    return 1.0


@pytest.mark.parametrize("recipe, encoder, variant", CONFIGS)
def test_decoder_cache_per_token(recipe, encoder, variant, char_token_list):
    """Cache bytes per token as the YAML options give them by hand; MLA and GQA a quarter of MHA."""
    config = config_path(recipe, encoder, variant)
    args, model = build_recipe_model(config, RECIPE_RATES[recipe], char_token_list)
    options = yaml.safe_load(config.read_text())
    d_model, heads = args.encoder_conf["output_size"], args.decoder_conf["attention_heads"]
    for layer in model.decoder.decoders:
        assert isinstance(layer.self_attn, ATTENTION_TYPES[variant])
        mha = 2 * d_model * 4  # float32 bytes per token
        for use in ("self", "src"):
            attention = getattr(layer, f"{use}_attn")
            kind = options["decoder_conf"][f"{use}_attention_type"]
            if kind == "linear":
                continue
            conf = options["decoder_conf"].get(f"{use}_attention_conf", {})
            expected = quarter_of_mha(kind, conf, d_model, heads)
            assert attention.cache_bytes(1) / mha == expected
            if variant in ("mla", "gqa"):
                assert expected == 0.25
