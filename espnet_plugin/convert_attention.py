"""`python -m espnet_plugin.bin.convert_attention`: a trained ESPnet ASR model's multi-head
attention turned into MLA or GQA (MHA2MLA for speech), or its encoder given dynamic chunking
(``--target dynamic_chunking``: :mod:`espnet_plugin.chunking_insertion`), ready to decode or to
fine-tune.

Reads an experiment (``--asr_train_config`` config.yaml, ``--asr_model_file``) whose encoder and/or
decoder use this project's MHA or ESPnet's stock ``MultiHeadedAttention`` (a stock Transformer
decoder becomes ``decoder: cached_transformer`` with its weights), converts the chosen modules one
by one (:mod:`espnet_plugin.nets.attention_conversion`) and writes into ``--out_dir``:

* ``config.yaml``: the same model with the converted modules' attention type and options;
* ``model.pth``: weights whose keys and shapes are exactly those of a model built from that config
  (checked here: ESPnet's loaders keep random weights for missing keys without a word);
* ``report.json``, printed as a table: per module the relative error of its output against the
  original's on the calibration utterances (teacher-forced for the decoder), the SVD tail energy
  and the cache bytes per position before and after; for the model the loss on those utterances,
  greedy and beam WER before any fine-tuning, and the KV cache ratio to the original.

Run it from the recipe folder (config.yaml names files relative to it). Calibration reads
``--calib_data`` (a wav.scp, with its ``text`` beside it).
"""

import argparse
import json
import logging
import math
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import soundfile
import torch
import yaml
from espnet2.tasks.asr import ASRTask
from torch import nn

import espnet_plugin  # noqa: F401  (registers the plugin's classes before a config is read)
from espnet_plugin.chunking_insertion import chunked_config, chunking_options, fresh_router
from espnet_plugin.cli import UserError
from espnet_plugin.hooks import intercepted
from espnet_plugin.nets.attention import Attention, GroupedQueryAttention, key_mask
from espnet_plugin.nets.attention_conversion import (
    FACTORIZATIONS,
    ROPE_SELECTIONS,
    is_mha,
    max_kv_latent_dim,
    mla_options,
    pair_norm_scores,
    select_rope_pairs,
    to_gqa,
    to_mla,
)
from espnet_plugin.nets.encoders import ChunkingStage
from espnet_plugin.nets.transformer_decoder import cached_decoder_conf
from espnet_plugin.recipe.kaldi_data import read_table, read_text
from espnet_plugin.recipe.score import score

MODULE_GROUPS = ("encoder_self", "decoder_self", "decoder_cross")
TARGETS = ("mla", "gqa", "dynamic_chunking")
OUTPUTS = ("config.yaml", "model.pth", "report.json")


class Site(NamedTuple):
    """One attention module of the model: its group and its name in the state dict."""

    group: str
    name: str
    module: nn.Module


def attention_sites(model: nn.Module) -> list[Site]:
    """Every attention module of the encoder blocks and the decoder layers, MHA or not."""
    sites = []
    for index, block in enumerate(getattr(model.encoder, "blocks", [])):
        mixer = getattr(block, "mixer", None)
        if isinstance(mixer, Attention):
            sites.append(Site("encoder_self", f"encoder.blocks.{index}.mixer", mixer))
    for index, layer in enumerate(getattr(model.decoder, "decoders", [])):
        for group, attr in (("decoder_self", "self_attn"), ("decoder_cross", "src_attn")):
            sites.append(Site(group, f"decoder.decoders.{index}.{attr}", getattr(layer, attr)))
    return sites


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m espnet_plugin.bin.convert_attention",
                                     description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    add = parser.add_argument
    add("--asr_train_config", type=Path, required=True, help="the experiment's config.yaml")
    add("--asr_model_file", type=Path, required=True, help="its weights, e.g. valid.acc.ave.pth")
    add("--out_dir", type=Path, required=True, help="where config.yaml, model.pth, report.json go")
    add("--target", choices=TARGETS, required=True)
    add("--modules", nargs="+", default=None,
        help=f"any of {', '.join(MODULE_GROUPS)} (default: every group that is MHA)")
    add("--kv_latent_dim", type=int, default=None,
        help="MLA latent size (default: a quarter of MHA's cache, d_model / 2 - rope_dim)")
    add("--rope_dim", type=int, default=None,
        help="MLA: rotary dims kept per head, even (default: a quarter of the pairs)")
    add("--rope_key_heads", type=int, default=1,
        help="MLA: rotary keys, each shared by a group of heads (1: DeepSeek's shared key)")
    add("--rope_select", choices=ROPE_SELECTIONS, default="2norm",
        help="MLA: which frequency pairs keep rotating, per layer")
    add("--factorization", choices=FACTORIZATIONS, default="joint", help="MLA: the latent's SVD")
    add("--n_kv_heads", type=int, default=None, help="GQA: key/value heads (default: heads / 4)")
    add("--after_block", type=int, default=None,
        help="dynamic_chunking: the block the router follows (required)")
    add("--target_ratio", type=float, default=0.5, help="dynamic_chunking: share of frames kept")
    add("--ratio_loss_weight", type=float, default=0.03,
        help="dynamic_chunking: weight of H-Net's ratio loss")
    add("--min_keep_ratio", type=float, default=0.25,
        help="dynamic_chunking: least share of an utterance's frames kept")
    add("--chunking_output", choices=ChunkingStage.OUTPUTS, default="compressed",
        help="dynamic_chunking: the encoder output's rate (see ChunkingStage)")
    add("--calib_data", type=Path, default=Path("dump/raw/dev/wav.scp"),
        help="calibration utterances (a wav.scp with its text beside it)")
    add("--calib_utts", type=int, default=64, help="how many of them (spread over the list)")
    add("--beam_size", type=int, default=10, help="beam of the WER before fine-tuning")
    add("--ctc_weight", type=float, default=0.3, help="CTC weight of the WER before fine-tuning")
    add("--no_wer", action="store_true", help="skip decoding (the report has no WER)")
    add("--device", default="cpu")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the plan, checked up front


class Plan(NamedTuple):
    """What to convert, with the options of the target, all checked."""

    target: str
    sites: list[Site]
    kv_latent_dim: Optional[int]
    rope_dim: int  # for rotary modules
    rope_key_heads: int
    n_kv_heads: Optional[int]


def head_sizes(module: nn.Module) -> tuple[int, int]:
    """(heads, head_dim) of an MHA of this project or of ESPnet."""
    if isinstance(module, GroupedQueryAttention):
        return module.n_heads, module.head_dim
    return module.h, module.d_k


def is_rotary(module: nn.Module) -> bool:
    return isinstance(module, GroupedQueryAttention) and module.rotary is not None


def make_plan(args: argparse.Namespace, model: nn.Module) -> Plan:
    """The modules to convert and their options; a UserError names any bad option."""
    sites = attention_sites(model)
    mha_groups = {site.group for site in sites if is_mha(site.module)}
    if not mha_groups:
        kinds = sorted({type(site.module).__name__ for site in sites}) or ["no attention at all"]
        raise UserError(f"{args.asr_train_config}: nothing to convert: the model has no "
                        f"multi-head attention ({', '.join(kinds)})")
    groups = args.modules or sorted(mha_groups, key=MODULE_GROUPS.index)
    for group in groups:
        if group not in MODULE_GROUPS:
            raise UserError(f"--modules {group}: unknown; expected any of "
                            f"{', '.join(MODULE_GROUPS)}")
        if group not in mha_groups:
            raise UserError(f"--modules {group}: {args.asr_train_config} has no multi-head "
                            f"attention there")
    chosen = [site for site in sites if site.group in groups]
    heads, head_dim = head_sizes(chosen[0].module)
    d_model = heads * head_dim
    rope_dim = args.rope_dim if args.rope_dim is not None else 2 * max(1, head_dim // 8)
    if args.target == "gqa":
        n_kv_heads = args.n_kv_heads if args.n_kv_heads is not None else max(1, heads // 4)
        if n_kv_heads < 1 or heads % n_kv_heads:
            raise UserError(f"--n_kv_heads {n_kv_heads} must divide the number of heads ({heads})")
        return Plan("gqa", chosen, None, 0, 1, n_kv_heads)
    if any(is_rotary(site.module) for site in chosen):
        if rope_dim % 2 or not 2 <= rope_dim <= head_dim:
            raise UserError(f"--rope_dim {rope_dim} must be an even number in 2..{head_dim} "
                            f"(the head size)")
        if args.rope_key_heads < 1 or heads % args.rope_key_heads:
            raise UserError(f"--rope_key_heads {args.rope_key_heads} must divide the number of "
                            f"heads ({heads})")
    kv_latent_dim = args.kv_latent_dim
    if kv_latent_dim is None:
        kv_latent_dim = d_model // 2 - args.rope_key_heads * rope_dim
    for site in chosen:
        full = max_kv_latent_dim(head_dim, heads, rope_dim if is_rotary(site.module) else 0)
        if not 1 <= kv_latent_dim <= full:
            raise UserError(f"--kv_latent_dim {kv_latent_dim} must lie in 1..{full} for "
                            f"{site.name} (full rank: its content key and value channels)")
    return Plan("mla", chosen, kv_latent_dim, rope_dim, args.rope_key_heads, None)


# ---------------------------------------------------------------- calibration data


class Utterance(NamedTuple):
    key: str
    speech: np.ndarray
    text: str
    tokens: np.ndarray


def calibration_keys(wav_scp: Path, count: int) -> list[str]:
    keys = sorted(read_table(wav_scp, value_name="audio path", sorted_ids=False))
    if count < 1:
        raise UserError(f"--calib_utts {count}: need at least 1")
    if len(keys) <= count:
        return keys
    return [keys[round(i * (len(keys) - 1) / (count - 1))] for i in range(count)] if count > 1 \
        else keys[:1]


def load_calibration(args: argparse.Namespace, train_args: argparse.Namespace) -> list[Utterance]:
    """The calibration utterances: audio, transcript and the model's tokens of it."""
    text_file = args.calib_data.parent / "text"
    if not args.calib_data.is_file():
        raise UserError(f"--calib_data {args.calib_data}: no such wav.scp")
    if not text_file.is_file():
        raise UserError(f"--calib_data {args.calib_data}: no transcripts beside it ({text_file})")
    paths = read_table(args.calib_data, value_name="audio path", sorted_ids=False)
    texts = read_text(text_file)
    preprocess = ASRTask.build_preprocess_fn(train_args, train=False)
    utterances = []
    for key in calibration_keys(args.calib_data, args.calib_utts):
        if key not in texts:
            raise UserError(f"{text_file}: no transcript of '{key}' of {args.calib_data}")
        try:
            speech, _ = soundfile.read(paths[key], dtype="float32")
        except (RuntimeError, OSError) as err:
            raise UserError(f"{args.calib_data}: utterance '{key}': cannot read {paths[key]}: "
                            f"{err}") from err
        tokens = preprocess(key, {"speech": speech, "text": texts[key]})["text"]
        utterances.append(Utterance(key, speech, texts[key], tokens))
    return utterances


def forward_each(model: nn.Module, utterances: list[Utterance], device: str) -> dict:
    """Teacher-forced losses per token and accuracy over the utterances, one at a time (no
    padding): ESPnet's losses sum over an utterance's tokens, its accuracy is per token."""
    totals, tokens = defaultdict(float), 0
    model.eval()
    with torch.no_grad():
        for utt in utterances:
            speech = torch.from_numpy(utt.speech)[None].to(device)
            text = torch.from_numpy(np.asarray(utt.tokens))[None].long().to(device)
            _, stats, _ = model(speech, torch.tensor([speech.size(1)], device=device), text,
                                torch.tensor([text.size(1)], device=device))
            for name in ("loss", "loss_att", "loss_ctc"):
                if stats.get(name) is not None:
                    totals[name] += float(stats[name])
            if stats.get("acc") is not None:
                totals["acc"] += float(stats["acc"]) * text.size(1)
            tokens += text.size(1)
    return {name: value / tokens for name, value in totals.items()}


# ---------------------------------------------------------------- watching attention calls


def watch(site: Site, on_call: Callable) -> list:
    """Context managers calling ``on_call(queries_input, keys_input, key_mask, output)`` for each
    attention computed by ``site`` in a teacher-forced forward (keys_input None: self-attention
    over the queries' input; ``key_mask`` as (batch, time) or None)."""
    module = site.module
    if not isinstance(module, Attention):  # ESPnet's stock MultiHeadedAttention
        def stock(a, out):
            self_attention = site.group == "decoder_self"
            keys = None if self_attention else a["key"]
            mask = None if self_attention else key_mask(a["mask"])
            on_call(a["query"], keys, mask, out)
        return [intercepted(module, "forward", stock)]
    if site.group == "encoder_self":
        return [intercepted(module, "forward", lambda a, out: on_call(a["x"], None, None, out))]
    if site.group == "decoder_self":
        return [intercepted(module, "causal", lambda a, out: on_call(a["x"], None, None, out[0]))]
    sources = {}

    def remember(a, memory):
        sources[id(memory)] = (a["source"], key_mask(a["mask"]))

    def attend(a, out):
        source, mask = sources[id(a["memory"])]
        on_call(a["x"], source, mask, out)

    return [intercepted(module, "memory", remember), intercepted(module, "attend", attend)]


def converted_output(site: Site, converted: nn.Module, queries, keys, mask) -> torch.Tensor:
    """What the converted module gives for the inputs the original saw."""
    if keys is not None:
        return converted.attend(queries, converted.memory(keys, mask))
    if site.group == "decoder_self":
        return converted.causal(queries)[0]
    return converted(queries)


def run_watched(model: nn.Module, utterances, device, watchers) -> None:
    with ExitStack() as stack:
        for manager in watchers:
            stack.enter_context(manager)
        forward_each(model, utterances, device)


def pair_scores(model, plan: Plan, utterances, device) -> dict[str, torch.Tensor]:
    """Per rotary site, the 2-norm score of each frequency pair on the calibration utterances."""
    queries, keys = defaultdict(list), defaultdict(list)
    watchers = []
    for site in plan.sites:
        if not is_rotary(site.module):
            continue
        heads, head_dim = head_sizes(site.module)

        def record(x, _keys, _mask, _out, site=site, heads=heads, head_dim=head_dim):
            with torch.no_grad():
                flat = x.reshape(-1, x.shape[-1])
                queries[site.name].append(site.module.linear_q(flat).view(-1, heads, head_dim))
                keys[site.name].append(site.module.linear_k(flat).view(-1, heads, head_dim))

        watchers += watch(site, record)
    run_watched(model, utterances, device, watchers)
    return {name: pair_norm_scores(torch.cat(queries[name]), torch.cat(keys[name]))
            for name in queries}


def output_errors(model, plan: Plan, converted: dict[str, nn.Module], utterances, device):
    """Per site, ||converted output - original output|| / ||original output|| (Frobenius) over
    every call of the calibration forward."""
    squared = defaultdict(lambda: [0.0, 0.0])
    watchers = []
    for site in plan.sites:
        def compare(queries, keys, mask, out, site=site):
            with torch.no_grad():
                new = converted_output(site, converted[site.name], queries, keys, mask)
            squared[site.name][0] += float((new - out).double().pow(2).sum())
            squared[site.name][1] += float(out.double().pow(2).sum())

        watchers += watch(site, compare)
    run_watched(model, utterances, device, watchers)
    return {name: math.sqrt(diff / total) if total else 0.0
            for name, (diff, total) in squared.items()}


# ---------------------------------------------------------------- the new config and weights


def converted_config(config: dict, plan: Plan, options: dict[str, dict]) -> dict:
    """``config`` with the converted groups' attention type and options (``options`` by group).
    A stock Transformer decoder becomes the cached one, under the same weights' names."""
    config = {**config, "encoder_conf": dict(config.get("encoder_conf") or {}),
              "decoder_conf": dict(config.get("decoder_conf") or {})}
    groups = {site.group for site in plan.sites}
    if "encoder_self" in groups:
        config["encoder_conf"].update(attention_type=plan.target,
                                      attention_conf=options["encoder_self"])
    if groups & {"decoder_self", "decoder_cross"} and config.get("decoder") == "transformer":
        try:
            config["decoder_conf"] = cached_decoder_conf(config["decoder_conf"])
        except ValueError as err:
            raise UserError(str(err)) from None
        config["decoder"] = "cached_transformer"
    for group, prefix in (("decoder_self", "self"), ("decoder_cross", "src")):
        if group in groups:
            config["decoder_conf"].update({f"{prefix}_attention_type": plan.target,
                                           f"{prefix}_attention_conf": options[group]})
    return config


def replaced_state(model: nn.Module, converted: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The model's state dict with each converted site's entries replaced by the new module's."""
    state = {key: value for key, value in model.state_dict().items()
             if not any(key.startswith(name + ".") for name in converted)}
    for name, module in converted.items():
        dtype = next(model.parameters()).dtype
        for key, value in module.state_dict().items():
            state[f"{name}.{key}"] = value.to(dtype) if value.is_floating_point() else value
    return state


def check_same_layout(state: dict, target: dict) -> None:
    """Keys and shapes of ``state`` must be exactly ``target``'s: fail loudly otherwise."""
    missing = sorted(target.keys() - state.keys())
    unexpected = sorted(state.keys() - target.keys())
    shapes = sorted(k for k in target.keys() & state.keys()
                    if tuple(target[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        raise RuntimeError(
            "the converted weights do not fit the converted config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes differ {shapes[:5]}"
        )


def build(config: dict, device: str) -> nn.Module:
    return ASRTask.build_model(argparse.Namespace(**config)).to(device)


# ---------------------------------------------------------------- WER before fine-tuning


def word_error_rates(config_file: Path, model_file: Path, utterances, args) -> dict[str, float]:
    """Greedy (beam 1) and beam WER on the calibration utterances, ESPnet's beam search."""
    from espnet2.bin.asr_inference import Speech2Text

    refs = {utt.key: utt.text for utt in utterances}
    rates = {}
    for name, beam in (("greedy", 1), ("beam", args.beam_size)):
        speech2text = Speech2Text(asr_train_config=config_file, asr_model_file=model_file,
                                  device=args.device, beam_size=beam, ctc_weight=args.ctc_weight,
                                  lm_weight=0.0, nbest=1)
        hyps = {utt.key: speech2text(utt.speech)[0][0] for utt in utterances}
        rates[name] = score(refs, hyps, "word").error_rate
    return rates


# ---------------------------------------------------------------- the whole conversion


def cache_bytes_per_position(module: nn.Module) -> int:
    if isinstance(module, Attention):
        return module.cache_bytes(1)
    heads, head_dim = head_sizes(module)
    return 2 * heads * head_dim * 4  # ESPnet's MHA keeps K and V, float32


def convert_sites(plan: Plan, scores: dict[str, torch.Tensor], rope_select: str,
                  factorization: str) -> tuple[dict[str, nn.Module], dict[str, dict], dict]:
    """Each site converted, the YAML options per group, and per-site details for the report."""
    converted, options, details = {}, {}, {}
    for site in plan.sites:
        if plan.target == "gqa":
            module = to_gqa(site.module, plan.n_kv_heads)
            options[site.group] = {"n_kv_heads": plan.n_kv_heads}
            details[site.name] = {}
        else:
            heads, head_dim = head_sizes(site.module)
            rotary = is_rotary(site.module)
            pairs = (select_rope_pairs(rope_select, head_dim, plan.rope_dim, scores.get(site.name))
                     if rotary else None)
            conversion = to_mla(site.module, plan.kv_latent_dim,
                                rope_dim=plan.rope_dim if rotary else 0,
                                rope_key_heads=plan.rope_key_heads, rope_pairs=pairs,
                                factorization=factorization)
            module = conversion.attention
            options[site.group] = mla_options(conversion)
            details[site.name] = conversion.report()
        converted[site.name] = module.to(next(site.module.parameters()).dtype).eval()
    return converted, options, details


def kv_cache_summary(sites: list[Site], converted: dict[str, nn.Module]) -> dict:
    """Cache bytes per position summed per group and over all, before and after."""
    summary = {}
    for group in (*MODULE_GROUPS, "all"):
        chosen = [s for s in sites if group in ("all", s.group)]
        if not chosen:
            continue
        before = sum(cache_bytes_per_position(s.module) for s in chosen)
        after = sum(cache_bytes_per_position(converted.get(s.name, s.module)) for s in chosen)
        summary[group] = {"before": before, "after": after, "ratio": after / before}
    return summary


def convert(args: argparse.Namespace) -> dict:
    for name in OUTPUTS[:2]:
        if (args.out_dir / name).exists():
            raise UserError(f"--out_dir {args.out_dir} already holds {name}; choose another or "
                            "remove it")
    for path in (args.asr_train_config, args.asr_model_file):
        if not path.is_file():
            raise UserError(f"no such file: {path}")
    config = yaml.safe_load(args.asr_train_config.read_text(encoding="utf-8"))
    train_args = argparse.Namespace(**config)
    model, _ = ASRTask.build_model_from_file(args.asr_train_config, args.asr_model_file,
                                             args.device)
    model.eval()
    utterances = load_calibration(args, train_args)
    if args.target == "dynamic_chunking":
        new_config, target, converted, report = insert_chunking(args, config, model)
    else:
        new_config, target, converted, report = convert_attention(args, config, model, utterances)
    state = replaced_state(model, converted)
    check_same_layout(state, target.state_dict())
    target.load_state_dict(state, strict=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "config.yaml").write_text(
        yaml.safe_dump(new_config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    torch.save(state, args.out_dir / "model.pth")

    report = {
        "source": {"config": str(args.asr_train_config), "model": str(args.asr_model_file)},
        "target": args.target,
        **report,
        "calibration": {"data": str(args.calib_data), "utterances": len(utterances)},
        "loss": {"original": forward_each(model, utterances, args.device),
                 "converted": forward_each(target, utterances, args.device)},
    }
    if not args.no_wer:
        report["wer"] = {
            "original": word_error_rates(args.asr_train_config, args.asr_model_file, utterances,
                                         args),
            "converted": word_error_rates(args.out_dir / "config.yaml", args.out_dir / "model.pth",
                                          utterances, args),
        }
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n",
                                              encoding="utf-8")
    print_report(report)
    return report


def convert_attention(args: argparse.Namespace, config: dict, model: nn.Module, utterances):
    """MHA to MLA or GQA: the new config, the model it builds, the converted modules by name, and
    the report's entries of the conversion."""
    plan = make_plan(args, model)
    logging.info(f"converting {len(plan.sites)} attention modules to {plan.target}, "
                 f"calibrating on {len(utterances)} utterances of {args.calib_data}")
    needs_scores = plan.target == "mla" and args.rope_select == "2norm"
    scores = pair_scores(model, plan, utterances, args.device) if needs_scores else {}
    converted, options, details = convert_sites(plan, scores, args.rope_select, args.factorization)
    errors = output_errors(model, plan, converted, utterances, args.device)
    new_config = converted_config(config, plan, options)
    report = {
        "options": {"kv_latent_dim": plan.kv_latent_dim, "rope_dim": plan.rope_dim,
                    "rope_key_heads": plan.rope_key_heads, "rope_select": args.rope_select,
                    "factorization": args.factorization, "n_kv_heads": plan.n_kv_heads,
                    "modules": sorted({s.group for s in plan.sites}, key=MODULE_GROUPS.index)},
        "modules": [
            {"name": s.name, "group": s.group, "relative_error": errors[s.name],
             "cache_bytes_per_position_before": cache_bytes_per_position(s.module),
             "cache_bytes_per_position_after": cache_bytes_per_position(converted[s.name]),
             **details[s.name]}
            for s in plan.sites
        ],
        "kv_cache": kv_cache_summary(attention_sites(model), converted),
    }
    return new_config, build(new_config, args.device), converted, report


def insert_chunking(args: argparse.Namespace, config: dict, model: nn.Module):
    """A fresh router after block ``--after_block``: the new config, the model it builds (its
    router initialised as a new one is), the router by name, and the report's options."""
    if args.after_block is None:
        raise UserError("--target dynamic_chunking needs --after_block (the block the router "
                        "follows)")
    options = chunking_options(args)
    new_config = chunked_config(config, model, options, str(args.asr_train_config))
    try:
        target = build(new_config, args.device)
    except ValueError as err:
        raise UserError(f"--target dynamic_chunking: {err}") from None
    return new_config, target.eval(), fresh_router(target), {"options": options, "modules": []}


def print_report(report: dict) -> None:
    print(f"{report['target'].upper()} from {report['source']['model']} "
          f"({report['calibration']['utterances']} calibration utterances)")
    print(f"{'module':<32} {'rel. error':>10} {'SVD tail':>9} {'B/pos before':>12} "
          f"{'after':>6}  rope pairs")
    for m in report["modules"]:
        tail = m.get("svd_tail_energy")
        print(f"{m['name']:<32} {m['relative_error']:>10.4f} "
              f"{'-' if tail is None else f'{tail:.4f}':>9} "
              f"{m['cache_bytes_per_position_before']:>12} "
              f"{m['cache_bytes_per_position_after']:>6}"
              f"  {m.get('rope_pairs') or '-'}")
    for group, cache in report.get("kv_cache", {}).items():
        print(f"cache per position, {group}: {cache['before']} -> {cache['after']} B "
              f"({cache['ratio']:.3f} of the original)")
    for name in ("original", "converted"):
        loss = report["loss"][name]
        wer = report.get("wer", {}).get(name)
        wer_text = "" if wer is None else (f", WER greedy {wer['greedy']:.1f} "
                                           f"beam {wer['beam']:.1f}")
        print(f"{name:>9}: loss {loss['loss']:.2f} (attention "
              f"{loss.get('loss_att', math.nan):.2f}, CTC {loss.get('loss_ctc', math.nan):.2f}), "
              f"accuracy {loss.get('acc', math.nan):.3f}{wer_text}")
    print("(loss per token; relative error: ||converted - original|| / ||original|| of each "
          "module's output)")


def main(argv=None) -> dict:
    return convert(parse_args(argv))
