"""`python -m espnet_plugin.bin.profile_kv_cache`: what a trained model's decoding costs, the
decoder's key/value cache above all, in a real decode of a test set (asr.sh's profiling stage).

The data set is decoded by ESPnet's own Speech2Text (BatchBeamSearch with CTC prefix scoring and,
if given, the LM), one utterance at a time, with the decoding options of ``--inference_config``
as ``asr_inference`` decodes them. It reports:

* the model's parameters, and for dynamic chunking the share of encoder frames it kept;
* per utterance, wall time (encoder and beam search, as Speech2Text runs them), the beam search's
  share, and the real-time factor, decode seconds per second of audio;
* peak memory of the decoding: ``torch.cuda.max_memory_allocated`` after a reset on a GPU; on a
  CPU the peak resident memory with the peak reset after loading and warm-up (Linux's
  ``clear_refs``), i.e. the decode's own peak, model weights included; where that reset is not
  possible, the process's lifetime peak, labelled as such;
* for ``decoder: cached_transformer``: per layer the analytic cache bytes per token
  (self-attention) and per encoder frame (cross-attention), the fixed part that does not grow
  (linear attention's state); per utterance the bytes of the cache tensors held at the last
  decoding step, self and cross, per hypothesis and for the whole beam (every storage counted
  once: the cross-attention memory is shared by all hypotheses), next to the analytic bytes and
  to what an MHA decoder of the same d_model, heads and layers would hold. ESPnet's stock
  decoder keeps each layer's outputs instead of keys and values: it has no cache to report.

``decode_stats.json`` in ``--output_dir`` holds the summary as top-level numbers, which
``espnet_plugin.recipe.report`` puts in the study's tables and plots, and the details nested.
"""

import argparse
import logging
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from statistics import mean
from typing import Iterable, Optional, Sequence

import humanfriendly
import torch
import yaml
from espnet2.bin.asr_inference import Speech2Text
from espnet2.tasks.asr import ASRTask
from espnet2.torch_utils.set_all_random_seed import set_all_random_seed
from espnet2.utils.types import str2triple_str, str_or_none

import espnet_plugin  # noqa: F401  (registers the plugin's classes before a config is read)
from espnet_plugin.benchmarks.timing import machine_info, synchronize, write_report
from espnet_plugin.cli import UserError
from espnet_plugin.compat import TooShortUttError
from espnet_plugin.hooks import intercepted
from espnet_plugin.nets.attention import (
    ATTENTION_TYPES,
    Attention,
    MultiHeadAttention,
    cache_nbytes,
)
from espnet_plugin.nets.transformer_decoder import CachedTransformerDecoder, DecoderState

STATS_FILE = "decode_stats.json"
# Speech2Text's decoding options that an inference config may set, with asr_inference's defaults.
DECODING = {"beam_size": 20, "ctc_weight": 0.5, "lm_weight": 1.0, "penalty": 0.0,
            "maxlenratio": 0.0, "minlenratio": 0.0}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m espnet_plugin.bin.profile_kv_cache",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )
    add = parser.add_argument
    add("--asr_train_config", type=Path, required=True, help="the model's config.yaml")
    add("--asr_model_file", type=Path, required=True, help="its weights, e.g. valid.acc.ave.pth")
    add("--lm_train_config", type=Path, help="an LM to fuse (its config.yaml)")
    add("--lm_file", type=Path, help="the LM's weights")
    add("--data_path_and_name_and_type", type=str2triple_str, action="append", required=True,
        help="as for asr_inference: dump/raw/test/wav.scp,speech,sound")
    add("--key_file", type=str_or_none, help="decode only these utterance ids")
    add("--output_dir", type=Path, required=True, help=f"where {STATS_FILE} goes")
    add("--inference_config", type=Path, help="the decoding YAML (beam_size, ctc_weight, ...)")
    for name, default in DECODING.items():
        add(f"--{name}", type=type(default), default=None,
            help=f"overrides the inference config (asr_inference's default: {default})")
    add("--device", default="cpu", help="cpu, cuda or cuda:N")
    add("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    add("--fs", type=str_or_none, help="audio sampling rate (default: the config's frontend fs)")
    add("--warmup", type=int, default=1, help="untimed decodes of the first utterance")
    add("--max_utterances", type=int, default=None, help="profile only the first N utterances")
    add("--num_threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    add("--seed", type=int, default=0)
    add("--log_level", default="WARNING")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # asr_inference options that do not change what is decoded (asr.sh passes them)
        logging.warning(f"ignoring options the profiler does not use: {' '.join(unknown)}")
    return args


def decoding_options(args: argparse.Namespace) -> dict:
    """The inference config's decoding options, the command line's over them."""
    options = dict(DECODING)
    if args.inference_config is not None:
        if not args.inference_config.is_file():
            raise UserError(f"--inference_config {args.inference_config}: no such file")
        config = yaml.safe_load(args.inference_config.read_text(encoding="utf-8")) or {}
        options.update({k: v for k, v in config.items() if k in DECODING})
    options.update({k: getattr(args, k) for k in DECODING if getattr(args, k) is not None})
    if args.lm_file is None:
        options["lm_weight"] = 0.0
    return options


class LastStep:
    """What beam search holds at the decoder's last step of an utterance.

    Inside ``with``, the decoder's ``init_state`` and ``batch_score`` are wrapped to record the
    encoder frames of the utterance and the prefix length and returned states of the latest
    step: every hypothesis of the beam at that step, whose caches are rows of the step's batch.
    The time from ``init_state`` to the end of the latest step is the beam search's.
    """

    def __init__(self, decoder: CachedTransformerDecoder):
        self.decoder = decoder
        self.frames: Optional[int] = None
        self.tokens: Optional[int] = None
        self.states: list[DecoderState] = []
        self.began = self.search_seconds = 0.0

    def __enter__(self) -> "LastStep":
        init_state, batch_score = self.decoder.init_state, self.decoder.batch_score

        def recording_init_state(x: torch.Tensor) -> DecoderState:
            self.frames, self.tokens, self.states = x.size(0), None, []
            self.began = time.perf_counter()
            return init_state(x)

        def recording_batch_score(ys: torch.Tensor, states, xs, *args, **kwargs):
            output, new_states = batch_score(ys, states, xs, *args, **kwargs)
            self.tokens, self.states = ys.size(1), new_states
            self.search_seconds = time.perf_counter() - self.began
            return output, new_states

        self.decoder.init_state = recording_init_state
        self.decoder.batch_score = recording_batch_score
        return self

    def __exit__(self, *exc_info) -> None:
        del self.decoder.init_state, self.decoder.batch_score  # the class's own methods again
        self.states = []


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``: the memory they keep alive."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def attention_type(attention: Attention) -> str:
    """The YAML name of an attention variant (mha, gqa, mla, linear)."""
    return next(name for name, cls in ATTENTION_TYPES.items() if type(attention) is cls)


def cache_growth(attention: Attention, dtype: torch.dtype) -> tuple[int, int]:
    """Analytic (bytes per cached token or frame, fixed bytes) of one attention's cache."""
    fixed = attention.cache_bytes(0, dtype)
    return attention.cache_bytes(1, dtype) - fixed, fixed


def mha_counterpart(decoder: CachedTransformerDecoder) -> Attention:
    """MHA of the decoder's d_model and heads, shapes only (no weights are allocated)."""
    attention = decoder.decoders[0].self_attn
    with torch.device("meta"):
        return MultiHeadAttention(attention.d_model, attention.n_heads)


def layer_sizes(decoder: CachedTransformerDecoder, dtype: torch.dtype) -> list[dict]:
    """Per layer, analytic: self-attention bytes per token, cross-attention bytes per frame."""
    sizes = []
    for layer in decoder.decoders:
        self_per_token, self_fixed = cache_growth(layer.self_attn, dtype)
        cross_per_frame, cross_fixed = cache_growth(layer.src_attn, dtype)
        sizes.append({
            "self_attention": attention_type(layer.self_attn),
            "self_bytes_per_token": self_per_token,
            "self_fixed_bytes": self_fixed,
            "cross_attention": attention_type(layer.src_attn),
            "cross_bytes_per_frame": cross_per_frame,
            "cross_fixed_bytes": cross_fixed,
        })
    return sizes


def measure_last_step(
    step: LastStep, decoder: CachedTransformerDecoder, dtype: torch.dtype, mha: Attention
) -> dict:
    """Measured and analytic cache bytes at the last step, all layers."""
    layers = decoder.decoders
    tokens, frames, states = step.tokens, step.frames, step.states
    hypotheses = len(states)
    self_per_hypothesis = sum(layer.self_attn.cache_bytes(tokens, dtype) for layer in layers)
    cross = sum(layer.src_attn.cache_bytes(frames, dtype) for layer in layers)
    mha_self = len(layers) * mha.cache_bytes(tokens, dtype)
    mha_cross = len(layers) * mha.cache_bytes(frames, dtype)
    memories = states[0].memories
    measured = {
        "self_per_hypothesis": max(sum(map(cache_nbytes, s.caches)) for s in states),
        "self_beam": held_bytes(t for s in states for cache in s.caches for t in cache),
        "cross_per_hypothesis": sum(cache_nbytes(memory.cache) for memory in memories),
        "cross_beam": held_bytes(t for memory in memories for t in memory.cache),
    }
    analytic = {
        "self_per_hypothesis": self_per_hypothesis,
        "self_beam": hypotheses * self_per_hypothesis,
        "cross_per_hypothesis": cross,
        "cross_beam": cross,  # one memory, shared by the beam
    }
    beam = measured["self_beam"] + measured["cross_beam"]
    mha_beam = hypotheses * mha_self + mha_cross
    return {
        "tokens": tokens,  # prefix length at the last step: <sos> and the tokens before the last
        "frames": frames,
        "hypotheses": hypotheses,
        "measured": measured,
        "analytic": analytic,
        "measured_equals_analytic": measured == analytic,
        "mha": {"self_per_hypothesis": mha_self, "cross_per_hypothesis": mha_cross,
                "beam": mha_beam},
        "beam_bytes": beam,
        "hypothesis_bytes": measured["self_per_hypothesis"] + measured["cross_per_hypothesis"],
        "ratio_to_mha": beam / mha_beam,
    }


def sampling_rate(fs: Optional[str], speech2text: Speech2Text, config: Path) -> int:
    """The audio's sampling rate: --fs, else the rate the model's frontend was trained at."""
    if speech2text.asr_model.frontend is None:
        raise UserError(
            f"{config}: the model has no frontend (it reads features), but the profiler times "
            "raw audio to give a real-time factor"
        )
    if fs is None:
        fs = (speech2text.asr_train_args.frontend_conf or {}).get("fs")
        if fs is None:
            raise UserError(f"{config}: frontend_conf has no fs; give the audio's rate with --fs")
    return int(humanfriendly.parse_size(fs) if isinstance(fs, str) else fs)


class PeakMemory:
    """The decoding's peak memory: reset once the model is loaded and warm, read at the end."""

    CLEAR_REFS, STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")

    def __init__(self, device: str):
        self.device = device

    def reset(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "torch.cuda.max_memory_allocated while decoding"
            return
        try:
            self.CLEAR_REFS.write_text("5")  # Linux: resets the peak resident set size (VmHWM)
            self.kind = "peak resident memory while decoding (model included)"
        except OSError:
            self.kind = "peak resident memory of the process (model loading included)"

    def peak_bytes(self) -> int:
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated(self.device)
        if self.STATUS.is_file():
            for line in self.STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        per_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * per_unit


class KeptFrames:
    """Frames the encoder's dynamic chunking kept and the frames it was given, summed."""

    def __init__(self):
        self.kept = self.frames = 0

    def __call__(self, arguments: dict, result) -> None:
        _, chunk_lengths, state = result
        self.kept += int(chunk_lengths.sum())
        self.frames += int(state.lengths.sum())


def decode_all(args, speech2text: Speech2Text, fs: int, peak: PeakMemory) -> tuple[list, dict]:
    """Decode every utterance, timing it and measuring the cache at its last step."""
    model = speech2text.asr_model
    loader = ASRTask.build_streaming_iterator(
        args.data_path_and_name_and_type,
        dtype=args.dtype,
        batch_size=1,
        key_file=args.key_file,
        num_workers=0,
        preprocess_fn=ASRTask.build_preprocess_fn(speech2text.asr_train_args, False),
        collate_fn=ASRTask.build_collate_fn(speech2text.asr_train_args, False),
        inference=True,
    )
    decoder = model.decoder if isinstance(model.decoder, CachedTransformerDecoder) else None
    dtype = getattr(torch, args.dtype)
    mha = None if decoder is None else mha_counterpart(decoder)
    device = torch.device(args.device)
    chunking = getattr(model.encoder, "chunking", None)
    kept = KeptFrames()
    utterances = []
    with LastStep(decoder) if decoder is not None else nullcontext() as step, \
            intercepted(chunking, "chunk", kept) if chunking is not None else nullcontext():
        for index, (keys, batch) in enumerate(loader):
            if args.max_utterances is not None and index >= args.max_utterances:
                break
            speech = batch["speech"][0]
            if index == 0:
                for _ in range(args.warmup):
                    speech2text(speech)
                kept.kept = kept.frames = 0
                peak.reset()
            synchronize(device)
            begin = time.perf_counter()
            try:
                speech2text(speech)
            except TooShortUttError as err:
                logging.warning(f"{keys[0]}: skipped, {err}")
                continue
            synchronize(device)
            seconds = time.perf_counter() - begin
            audio_seconds = speech.numel() / fs
            utterance = {"key": keys[0], "audio_seconds": audio_seconds, "decode_seconds": seconds,
                         "rtf": seconds / audio_seconds}
            if step is not None and step.states:
                utterance["search_seconds"] = step.search_seconds
                utterance.update(measure_last_step(step, decoder, dtype, mha))
                step.states = []  # measured: let the caches go before the next utterance
            utterances.append(utterance)
    chunked = None if chunking is None else {
        "kept_frames": kept.kept, "frames": kept.frames, "ratio": kept.kept / max(kept.frames, 1)}
    return utterances, chunked


def cache_summary(decoder, utterances: list[dict], dtype: torch.dtype) -> Optional[dict]:
    """The report's cache numbers, or None where the decoder keeps no key/value cache."""
    measured = [u for u in utterances if "beam_bytes" in u]
    if decoder is None or not measured:
        return None
    layers = layer_sizes(decoder, dtype)
    beam = mean(u["beam_bytes"] for u in measured)
    mha_beam = mean(u["mha"]["beam"] for u in measured)
    return {
        "self_bytes_per_token": sum(layer["self_bytes_per_token"] for layer in layers),
        "self_fixed_bytes": sum(layer["self_fixed_bytes"] for layer in layers),
        "cross_bytes_per_frame": sum(layer["cross_bytes_per_frame"] for layer in layers),
        "beam_bytes_per_utterance": beam,
        "hypothesis_bytes_per_utterance": mean(u["hypothesis_bytes"] for u in measured),
        "mha_beam_bytes_per_utterance": mha_beam,
        "ratio_to_mha_analytic": beam / mha_beam,
        "measured_equals_analytic": all(u["measured_equals_analytic"] for u in measured),
        "largest_beam_bytes": max(u["beam_bytes"] for u in measured),
        "layers": layers,
    }


def summarise(args, speech2text, utterances: list[dict], chunking, peak: PeakMemory,
              options: dict) -> dict:
    """Top-level numbers for the report, the details nested."""
    model = speech2text.asr_model
    decoder = model.decoder if isinstance(model.decoder, CachedTransformerDecoder) else None
    audio = sum(u["audio_seconds"] for u in utterances)
    decode = sum(u["decode_seconds"] for u in utterances)
    return {
        "utterances": len(utterances),
        "audio_seconds": audio,
        "decode_ms_per_utterance": 1000 * decode / len(utterances),
        "rtf": decode / audio,
        "peak_memory_bytes": peak.peak_bytes(),
        "peak_memory_kind": peak.kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "kv_cache": cache_summary(decoder, utterances, getattr(torch, args.dtype)),
        "chunking": chunking,
        "settings": {**options, "device": args.device, "dtype": args.dtype,
                     "torch_threads": torch.get_num_threads(), "warmup": args.warmup,
                     "lm": None if args.lm_file is None else str(args.lm_file)},
        "model": {"config": str(args.asr_train_config), "weights": str(args.asr_model_file),
                  "encoder": getattr(speech2text.asr_train_args, "encoder", None),
                  "decoder": getattr(speech2text.asr_train_args, "decoder", None),
                  "decoder_conf": getattr(speech2text.asr_train_args, "decoder_conf", {})},
        "machine": machine_info(args.device),
        "per_utterance": utterances,
    }


def print_table(stats: dict) -> None:
    print(f"{stats['model']['config']}: {stats['parameters']} parameters, decoded "
          f"{stats['utterances']} utterances ({stats['audio_seconds']:.1f} s of audio) on "
          f"{stats['settings']['device']}: RTF {stats['rtf']:.4f}, "
          f"{stats['decode_ms_per_utterance']:.0f} ms per utterance, peak memory "
          f"{stats['peak_memory_bytes'] / 2**20:.1f} MiB ({stats['peak_memory_kind']})")
    if stats["chunking"] is not None:
        c = stats["chunking"]
        print(f"dynamic chunking kept {c['kept_frames']} of {c['frames']} frames "
              f"({c['ratio']:.3f})")
    cache = stats["kv_cache"]
    if cache is None:
        print("the decoder keeps no key/value cache (decoder: "
              f"{stats['model']['decoder']}): nothing to measure there")
        return
    print(f"\n{'layer: self / cross, analytic':<34} {'self B/token':>12} {'fixed B':>9}"
          f" {'cross B/frame':>13} {'fixed B':>9}")
    for index, layer in enumerate(cache["layers"], 1):
        kinds = f"{layer['self_attention']} / {layer['cross_attention']}"
        print(f"{index:>5}: {kinds:<27} {layer['self_bytes_per_token']:>12} "
              f"{layer['self_fixed_bytes']:>9} {layer['cross_bytes_per_frame']:>13} "
              f"{layer['cross_fixed_bytes']:>9}")
    print(f"\n{'utterance':<24} {'audio s':>7} {'dec. s':>7} {'beam s':>7} {'RTF':>6}"
          f" {'tok':>4} {'frm':>4}"
          f" {'hyp':>3} {'self B/hyp':>11} {'self beam B':>11} {'cross B':>9} {'vs MHA':>6}  ok")
    for u in stats["per_utterance"]:
        if "measured" not in u:
            continue
        measured = u["measured"]
        print(f"{u['key'][:24]:<24} {u['audio_seconds']:>7.2f} {u['decode_seconds']:>7.3f}"
              f" {u['search_seconds']:>7.3f} {u['rtf']:>6.3f} {u['tokens']:>4} {u['frames']:>4}"
              f" {u['hypotheses']:>3} {measured['self_per_hypothesis']:>11}"
              f" {measured['self_beam']:>11} {measured['cross_beam']:>9}"
              f" {u['ratio_to_mha']:>6.3f}  {'=' if u['measured_equals_analytic'] else 'MISMATCH'}")
    print(f"\ncache of the beam at the last step: {cache['beam_bytes_per_utterance'] / 1024:.1f} "
          f"KiB per utterance on average, {cache['ratio_to_mha_analytic']:.3f} of an MHA "
          f"decoder's ({cache['mha_beam_bytes_per_utterance'] / 1024:.1f} KiB)")
    print("(ok: '=' when the measured bytes equal the analytic ones, per hypothesis and beam)")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.getLogger().setLevel(args.log_level.upper())  # also when espnet configured logging
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    set_all_random_seed(args.seed)
    if (args.lm_file is None) != (args.lm_train_config is None):
        raise UserError("--lm_train_config and --lm_file go together")
    options = decoding_options(args)
    speech2text = Speech2Text(
        asr_train_config=args.asr_train_config,
        asr_model_file=args.asr_model_file,
        lm_train_config=args.lm_train_config,
        lm_file=args.lm_file,
        device=args.device,
        dtype=args.dtype,
        nbest=1,
        **options,
    )
    fs = sampling_rate(args.fs, speech2text, args.asr_train_config)
    peak = PeakMemory(args.device)
    utterances, chunking = decode_all(args, speech2text, fs, peak)
    if not utterances:
        raise UserError(f"no utterance was decoded from {args.data_path_and_name_and_type}")
    stats = summarise(args, speech2text, utterances, chunking, peak, options)
    print_table(stats)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_report(args.output_dir / STATS_FILE, stats)
    return stats
