"""The study as ``asr.sh`` leaves it under ``exp/``: how each model was made, what each of its
decodes scored and cost, and whether those results still match the files they were made from.

The layout, all that is read (paths in stamps are relative to the recipe dir, exp_dir's parent):

    <exp_dir>/<model>/config.yaml               ESPnet's config: encoder, attention, sizes
    <exp_dir>/<model>/.stamp                    training inputs; options finetune_from, convert_args
    <exp_dir>/<model>/conversion/report.json    only for a model whose attention was converted
    <exp_dir>/<model>/<decode_dir>/<test_set>/  .stamp: options inference_args, inference_config, lm
        score_word/, score_char/                result.json, utterances.json, .stamp
        profile/                                decode_stats.json, .stamp

The model is the path from ``exp_dir`` down to the folder holding config.yaml, however deep
(``exp/ablation/asr_x``). A system is one model decoded one way: (model, decode dir).
"""

import json
import os
import re
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import yaml

from espnet_plugin.cli import UserError
from espnet_plugin.recipe.score import (
    RESULT_FILE,
    UNITS,
    UTTERANCES_FILE,
    UtteranceCounts,
    is_count,
    read_summary,
    read_utterance_counts,
)
from espnet_plugin.recipe.stamp import ABSENT, STAMP_FILE, file_hash

CONFIG_FILE = "config.yaml"
CONVERSION_REPORT = "conversion/report.json"
PROFILE_DIR, PROFILE_FILE = "profile", "decode_stats.json"
BATCHES_FILE = "kv_batch.json"  # benchmark_kv_batch's, in PROFILE_DIR where stage 10 ran it
LAYOUT = (
    f"<exp_dir>/<model>/<decode_dir>/<test_set>/score_<unit>/{RESULT_FILE} with "
    f"<exp_dir>/<model>/{CONFIG_FILE}"
)
NO_ATTENTION = "-"
# The study's encoder families and attention types, in the order its tables list them.
ENCODER_ORDER = ("conformer", "branchformer", "conmamba")
ATTENTION_ORDER = ("mha", "mla", "gqa", "linear")
# The study's encoder families by ESPnet's encoder names; other encoders keep their own name.
ENCODER_FAMILIES = {"conformer_x": "conformer", "branchformer_x": "branchformer"}
ATTENTION_FREE = {"conmamba", "rnn", "vgg_rnn"}  # encoders / decoders without attention
ESPNET_LM_WEIGHT = 1.0  # asr_inference's --lm_weight default, used when nothing sets it


def rank(value: str, order: tuple[str, ...]) -> tuple:
    """Known values in the study's order, others after them by name, "-" last."""
    if value in order:
        return 0, order.index(value), ""
    return (2 if value == NO_ATTENTION else 1), 0, value


def ordered(values, order: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(set(values), key=lambda v: rank(v, order)))


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_yaml_mapping(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping of options")
    return data


@dataclass(frozen=True)
class Architecture:
    """What a config.yaml says about the things the study varies."""

    encoder: str  # conformer / branchformer / conmamba, or ESPnet's own name of another encoder
    attention: str  # the encoder's attention type; "-" for an encoder without attention
    decoder_attention: str  # the decoder's self-attention type; "-" without one
    size: tuple  # encoder output_size and num_blocks, decoder num_blocks (None where unset)
    chunking: bool  # the encoder has dynamic chunking
    chunking_design: str = ""  # its options (router position, target ratio, ...) as JSON
    input_layer: Optional[str] = None  # the encoder's input layer: it sets the frame rate

    @property
    def shape(self) -> tuple:
        """Size and frame rate: what the two models of a question's pair share."""
        return (*self.size, self.input_layer)


def _section(config: dict, key: str, path: Path) -> dict:
    section = config.get(key) or {}
    if not isinstance(section, dict):
        raise UserError(f"{path}: '{key}' must be a mapping of options, got {section!r}")
    return section


def read_architecture(path: Path) -> Architecture:
    config = read_yaml_mapping(path)
    encoder = config.get("encoder")
    if not isinstance(encoder, str):
        raise UserError(f"{path}: lacks the encoder name ('encoder: conformer_x', ...)")
    encoder_conf = _section(config, "encoder_conf", path)
    decoder_conf = _section(config, "decoder_conf", path)
    decoder = str(config.get("decoder") or "none")
    if encoder in ATTENTION_FREE:
        attention = NO_ATTENTION
    else:
        attention = str(encoder_conf.get("attention_type", "mha"))
    if decoder == "cached_transformer":
        decoder_attention = str(decoder_conf.get("self_attention_type", "mha"))
    elif decoder == "transformer":
        decoder_attention = "mha"
    elif decoder in ATTENTION_FREE or decoder == "none":
        decoder_attention = NO_ATTENTION
    else:
        decoder_attention = decoder
    return Architecture(
        encoder=ENCODER_FAMILIES.get(encoder, encoder),
        attention=attention,
        decoder_attention=decoder_attention,
        size=(encoder_conf.get("output_size"), encoder_conf.get("num_blocks"),
              decoder_conf.get("num_blocks")),
        chunking=bool(encoder_conf.get("dynamic_chunking")),
        chunking_design=json.dumps(encoder_conf.get("dynamic_chunking") or {}, sort_keys=True),
        input_layer=encoder_conf.get("input_layer"),
    )


@dataclass(frozen=True)
class Model:
    """One trained (or converted, or fine-tuned) model of the study."""

    name: str  # its path under exp_dir
    arch: Architecture
    origin: str  # scratch, finetuned (from finetune_from) or converted (then fine-tuned or not)
    finetune_from: str | None  # the starting model's name under exp_dir (else the path as given)
    source: Architecture | None  # the starting model's, where its config is still there
    seed: int | None = None  # ESPnet's --seed of its training, where asr_args gave one

    @property
    def group(self) -> str:
        """The model its seeds share: the name without ``_seed<k>`` (the study driver's)."""
        suffix = f"_seed{self.seed}"
        return self.name[: -len(suffix)] if self.seed is not None and self.name.endswith(
            suffix) else self.name

    def _label(self, own: str, before: str) -> str:
        return own if self.origin != "converted" or own == before else f"{own} (from {before})"

    @property
    def attention_label(self) -> str:
        """The encoder's attention, "mla (from mha)" where the conversion changed it."""
        before = self.source.attention if self.source else "?"
        return self._label(self.arch.attention, before)

    @property
    def decoder_attention_label(self) -> str:
        before = self.source.decoder_attention if self.source else "?"
        return self._label(self.arch.decoder_attention, before)


@dataclass
class TestSet:
    """One test set decoded by one system: scores, utterance counts, profile, staleness."""

    name: str
    path: Path
    scores: dict[str, dict]  # unit -> result.json
    counts: dict[str, dict[str, UtteranceCounts]]  # unit -> utterances.json, where it was written
    profile: dict | None  # decode_stats.json
    decoding: dict  # the decode stamp's options
    stale: list[str]  # why its results no longer match their inputs (empty: current)


@dataclass
class System:
    """One model decoded one way (a decode dir), on one or more test sets."""

    model: Model
    decode: str
    test_sets: dict[str, TestSet]
    lm: str | None  # the LM dir's name
    lm_weight: float | None

    @property
    def name(self) -> str:
        return f"{self.model.name}/{self.decode}"

    @property
    def stale(self) -> list[str]:
        return [reason for test_set in self.test_sets.values() for reason in test_set.stale]

    @property
    def decoding(self) -> dict:
        """The decoding options, the same for every test set of one decode dir."""
        return next(iter(self.test_sets.values())).decoding


def read_stamp(folder: Path) -> dict | None:
    """``folder``'s stamp (see :mod:`espnet_plugin.recipe.stamp`), or None where it has none."""
    path = folder / STAMP_FILE
    if not path.is_file():
        return None
    stamp = read_json_object(path)
    if not all(isinstance(stamp.get(key, {}), dict) for key in ("options", "files")):
        raise UserError(f"{path}: 'options' and 'files' must be JSON objects")
    return stamp


class StampCheck:
    """Whether outputs still match the input files their stamps list; each file hashed once."""

    def __init__(self, recipe_dir: Path):
        self.recipe_dir = recipe_dir  # stamps name files relative to it
        self._hashes: dict[Path, str] = {}

    def _hash(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = file_hash(path)
        return self._hashes[path]

    def check(self, folder: Path) -> tuple[dict, list[str]]:
        """The stamp's options, and why ``folder`` is stale (empty when it is current)."""
        shown = os.path.relpath(folder, self.recipe_dir)
        stamp = read_stamp(folder)
        if stamp is None:
            return {}, [f"{shown} has no {STAMP_FILE}: nothing records what it was made from"]
        reasons = []
        for name, recorded in sorted(stamp.get("files", {}).items()):
            now = self._hash((self.recipe_dir / name).resolve())
            if now != recorded:
                change = "is gone" if now == ABSENT else "has changed"
                reasons.append(f"{name} {change} since {shown} was made")
        return stamp.get("options", {}), reasons


def _model_name(path: str, exp_dir: Path, recipe_dir: Path) -> str:
    """A model path from a stamp as its name under exp_dir, where it lies there."""
    try:
        return (recipe_dir / path).resolve().relative_to(exp_dir.resolve()).as_posix()
    except ValueError:
        return path


def read_model(model_dir: Path, exp_dir: Path, stamps: StampCheck) -> Model:
    config = model_dir / CONFIG_FILE
    if not config.is_file():
        raise UserError(f"{model_dir} holds decodes but no {CONFIG_FILE}; expected {LAYOUT}")
    options = (read_stamp(model_dir) or {}).get("options", {})
    finetune_from = options.get("finetune_from") or None
    conversion = model_dir / CONVERSION_REPORT
    converted = bool(options.get("convert_args")) or conversion.is_file()
    source_configs = []
    if finetune_from:
        source_configs.append(stamps.recipe_dir / finetune_from / CONFIG_FILE)
    if conversion.is_file():
        source = read_json_object(conversion).get("source")
        if isinstance(source, dict) and isinstance(source.get("config"), str):
            source_configs.append(stamps.recipe_dir / source["config"])
    source = next((read_architecture(p) for p in source_configs if p.is_file()), None)
    seed = re.search(r"--seed[=\s]+(\d+)", str(options.get("asr_args", "")))
    return Model(
        name=model_dir.relative_to(exp_dir).as_posix(),
        arch=read_architecture(config),
        origin="converted" if converted else "finetuned" if finetune_from else "scratch",
        finetune_from=finetune_from and _model_name(finetune_from, exp_dir, stamps.recipe_dir),
        source=source,
        seed=int(seed.group(1)) if seed else None,
    )


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# decode_stats.json: key -> (check, what it must be); nested sections are checked the same way.
PROFILE_KEYS = {
    "utterances": (lambda v: is_count(v) and v > 0, "a positive whole number"),
    "audio_seconds": (lambda v: is_number(v) and v > 0, "a positive number"),
    "decode_ms_per_utterance": (is_number, "a number"),
    "rtf": (is_number, "a number"),
    "peak_memory_bytes": (lambda v: v is None or is_count(v), "a whole number or null"),
    "peak_memory_kind": (lambda v: isinstance(v, str), "a string"),
    "parameters": (is_count, "a whole number"),
    "kv_cache": (lambda v: v is None or isinstance(v, dict), "null or an object"),
    "chunking": (lambda v: v is None or isinstance(v, dict), "null or an object"),
}
KV_CACHE_KEYS = {
    "beam_bytes_per_utterance": (is_number, "a number"),
    "ratio_to_mha_analytic": (is_number, "a number"),
}
BATCH_ROW_KEYS = {
    "batch_size": (lambda v: is_count(v) and v > 0, "a positive whole number"),
    "seconds": (lambda v: is_number(v) and v > 0, "a positive number"),
    "utterances_per_second": (is_number, "a number"),
    "peak_bytes": (is_count, "a whole number"),
}
CHUNKING_KEYS = {
    "kept_frames": (is_count, "a whole number"),
    "frames": (is_count, "a whole number"),
}


def _check_keys(data: dict, keys: dict, where: str) -> None:
    for key, (valid, expected) in keys.items():
        if key not in data:
            raise UserError(f"{where} lacks '{key}'")
        if not valid(data[key]):
            raise UserError(f"{where}: '{key}' must be {expected}, got {data[key]!r}")


def read_profile(path: Path) -> dict:
    """A decode_stats.json, checked for the numbers the report uses."""
    profile = read_json_object(path)
    _check_keys(profile, PROFILE_KEYS, str(path))
    if profile["kv_cache"] is not None:
        _check_keys(profile["kv_cache"], KV_CACHE_KEYS, f"{path} kv_cache")
    if profile["chunking"] is not None:
        _check_keys(profile["chunking"], CHUNKING_KEYS, f"{path} chunking")
    return profile


def read_batches(path: Path) -> dict:
    """The model of a ``benchmark_kv_batch`` JSON (stage 10 measures one): its rows by batch
    size, the budget and the largest batch within it."""
    models = read_json_object(path).get("models")
    if not isinstance(models, list) or len(models) != 1 or not isinstance(models[0], dict):
        raise UserError(f"{path}: expected 'models', a list of one benchmark_kv_batch model")
    model = models[0]
    rows = model.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: the model needs 'rows', a list of objects")
    for index, row in enumerate(rows):
        _check_keys(row, BATCH_ROW_KEYS, f"{path} row {index}")
    _check_keys(model, {"largest_batch_within_budget": (
        lambda v: v is None or is_count(v), "a whole number or null")}, str(path))
    return model


def read_test_set(folder: Path, stamps: StampCheck) -> TestSet:
    decoding, stale = stamps.check(folder)
    scores, counts = {}, {}
    for unit in UNITS:
        score_dir = folder / f"score_{unit}"
        if not (score_dir / RESULT_FILE).is_file():
            continue
        scores[unit] = read_summary(score_dir / RESULT_FILE)
        if scores[unit]["unit"] != unit:
            raise UserError(f"{score_dir / RESULT_FILE}: unit '{scores[unit]['unit']}' in a "
                            f"score_{unit} folder")
        if (score_dir / UTTERANCES_FILE).is_file():
            counts[unit] = read_utterance_counts(score_dir / UTTERANCES_FILE)
        stale += stamps.check(score_dir)[1]
    profile = None
    if (folder / PROFILE_DIR / PROFILE_FILE).is_file():
        profile = read_profile(folder / PROFILE_DIR / PROFILE_FILE)
        batches = folder / PROFILE_DIR / BATCHES_FILE
        profile["batches"] = read_batches(batches) if batches.is_file() else None
        stale += stamps.check(folder / PROFILE_DIR)[1]
    return TestSet(folder.name, folder, scores, counts, profile, decoding, stale)


def lm_weight(decoding: dict, recipe_dir: Path) -> float | None:
    """--lm_weight of inference_args, else the inference config's, else asr_inference's default."""
    given = re.search(r"--lm_weight[=\s]+(\S+)", decoding.get("inference_args", ""))
    if given:
        try:
            return float(given.group(1))
        except ValueError:
            return None
    config = decoding.get("inference_config", "")
    if not config:
        return ESPNET_LM_WEIGHT
    if not (recipe_dir / config).is_file():
        return None  # gone: the decode's stamp says so too
    weight = read_yaml_mapping(recipe_dir / config).get("lm_weight", ESPNET_LM_WEIGHT)
    return float(weight) if is_number(weight) else None


def read_study(exp_dir: Path, skip: list[Path]) -> list[System]:
    """Every system under ``exp_dir`` with a scored test set, in path order.

    ``skip``: folders not to look in (the report's own). Raises :class:`UserError` on a layout or
    file that is not what asr.sh writes, naming it.
    """
    skip = [folder.resolve() for folder in skip]
    # Lexically, not through symlinks: asr.sh ran in the recipe dir, whatever exp/ links to.
    recipe_dir = Path(os.path.abspath(exp_dir)).parent
    stamps = StampCheck(recipe_dir)
    test_set_dirs = set()
    for unit in UNITS:
        for path in exp_dir.rglob(f"score_{unit}/{RESULT_FILE}"):
            if any(path.resolve().is_relative_to(folder) for folder in skip):
                continue
            if len(path.relative_to(exp_dir).parts) < 5:
                raise UserError(f"{path} is too shallow for the layout {LAYOUT}")
            test_set_dirs.add(path.parent.parent)
    models: dict[Path, Model] = {}
    systems: dict[Path, System] = {}
    for folder in sorted(test_set_dirs):
        decode_dir = folder.parent
        model_dir = decode_dir.parent
        if model_dir not in models:
            models[model_dir] = read_model(model_dir, exp_dir, stamps)
        test_set = read_test_set(folder, stamps)
        if decode_dir not in systems:
            lm = test_set.decoding.get("lm", "none")
            has_lm = lm not in ("none", "")
            systems[decode_dir] = System(
                models[model_dir], decode_dir.name, {},
                lm=Path(lm).name if has_lm else None,
                lm_weight=lm_weight(test_set.decoding, recipe_dir) if has_lm else None,
            )
        systems[decode_dir].test_sets[test_set.name] = test_set
    return list(systems.values())
