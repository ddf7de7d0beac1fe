"""`python -m espnet_plugin.bin.profile_kv_cache`: what a trained model's decoder cache costs in a
real decode, next to the time and memory of that decode.

The data set is decoded by ESPnet's own Speech2Text (BatchBeamSearch with CTC prefix scoring), one
utterance at a time, as ``asr_inference`` decodes it. For a model whose decoder is
``decoder: cached_transformer`` it reports:

* per layer, the analytic cache bytes per token (self-attention) and per encoder frame
  (cross-attention) from the attention variants' shapes and the model's dtype, with the fixed
  part that does not grow (linear attention's state);
* per utterance, the bytes of the cache tensors held at the last decoding step, self and cross:
  per hypothesis (its own rows), and for the whole beam (every storage the beam's caches keep
  alive, counted once: the cross-attention memory is one object shared by all hypotheses), next
  to the analytic bytes and to what an MHA decoder of the same d_model, heads and layers holds;
* wall time per utterance (encoder and beam search, as Speech2Text runs them), the beam
  search's share of it, and the real-time factor, decode seconds per second of audio;
* peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on CPU.

``decode_stats.json`` in ``--output_dir`` (the decode dir's test-set folder) carries the summary as
top-level numbers, which ``espnet_plugin.recipe.report`` adds to RESULTS.md and plots (``rtf``,
``kv_cache_bytes``, ``peak_memory_bytes``), and the details nested.
"""

import argparse
import logging
import resource
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Iterable, Optional, Sequence

import humanfriendly
import torch
from espnet2.bin.asr_inference import Speech2Text
from espnet2.tasks.asr import ASRTask
from espnet2.torch_utils.set_all_random_seed import set_all_random_seed
from espnet2.utils.types import str2triple_str, str_or_none

import espnet_plugin  # noqa: F401  (registers the plugin's classes before a config is read)
from espnet_plugin.benchmarks.timing import machine_info, synchronize, write_report
from espnet_plugin.cli import UserError
from espnet_plugin.compat import TooShortUttError
from espnet_plugin.nets.attention import (
    ATTENTION_TYPES,
    Attention,
    MultiHeadAttention,
    cache_nbytes,
)
from espnet_plugin.nets.transformer_decoder import CachedTransformerDecoder, DecoderState

STATS_FILE = "decode_stats.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m espnet_plugin.bin.profile_kv_cache",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )
    add = parser.add_argument
    add("--asr_train_config", type=Path, required=True, help="the model's config.yaml")
    add("--asr_model_file", type=Path, required=True, help="its weights, e.g. valid.acc.ave.pth")
    add("--data_path_and_name_and_type", type=str2triple_str, action="append", required=True,
        help="as for asr_inference: dump/raw/test/wav.scp,speech,sound")
    add("--key_file", type=str_or_none, help="decode only these utterance ids")
    add("--output_dir", type=Path, required=True, help=f"where {STATS_FILE} goes")
    add("--beam_size", type=int, default=10)
    add("--ctc_weight", type=float, default=0.3)
    add("--penalty", type=float, default=0.0)
    add("--maxlenratio", type=float, default=0.0)
    add("--minlenratio", type=float, default=0.0)
    add("--device", default="cpu", help="cpu, cuda or cuda:N")
    add("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    add("--fs", type=str_or_none, help="audio sampling rate (default: the config's frontend fs)")
    add("--warmup", type=int, default=1, help="untimed decodes of the first utterance")
    add("--num_threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    add("--seed", type=int, default=0)
    add("--log_level", default="WARNING")
    return parser.parse_args(argv)


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
        "ratio_to_mha": beam / mha_beam,
    }


def require_cached_decoder(speech2text: Speech2Text, config: Path) -> CachedTransformerDecoder:
    decoder = speech2text.asr_model.decoder
    if not isinstance(decoder, CachedTransformerDecoder):
        name = getattr(speech2text.asr_train_args, "decoder", None)
        raise UserError(
            f"{config}: the decoder is {type(decoder).__name__} (decoder: {name}); the profiler "
            "measures the key/value cache of 'decoder: cached_transformer' and needs it. ESPnet's "
            "TransformerDecoder keeps each layer's outputs as its beam-search state, not keys and "
            "values, so there is no cache to measure. Train with 'decoder: cached_transformer' "
            "(with position: absolute and MHA, a stock decoder's weights load into it as they are)"
        )
    return decoder


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


def peak_memory(device: str) -> tuple[int, str]:
    """Peak memory in bytes and what was measured."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    per_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * per_unit, "process peak RSS"


def decode_all(args: argparse.Namespace, speech2text: Speech2Text, decoder, fs: int) -> list[dict]:
    """Decode every utterance, timing it and measuring the cache at its last step."""
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
    dtype, mha = getattr(torch, args.dtype), mha_counterpart(decoder)
    utterances = []
    with LastStep(decoder) as step:
        for index, (keys, batch) in enumerate(loader):
            speech = batch["speech"][0]
            if index == 0:
                for _ in range(args.warmup):
                    speech2text(speech)
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats(args.device)
            synchronize(torch.device(args.device))
            begin = time.perf_counter()
            try:
                speech2text(speech)
            except TooShortUttError as err:
                logging.warning(f"{keys[0]}: skipped, {err}")
                continue
            synchronize(torch.device(args.device))
            seconds = time.perf_counter() - begin
            audio_seconds = speech.numel() / fs
            utterance = {"key": keys[0], "audio_seconds": audio_seconds, "decode_seconds": seconds,
                         "rtf": seconds / audio_seconds, "search_seconds": step.search_seconds}
            utterances.append({**utterance, **measure_last_step(step, decoder, dtype, mha)})
            step.states = []  # measured: let the caches go before the next utterance
    return utterances


def summarise(args, speech2text, decoder, utterances: list[dict]) -> dict:
    """Top-level numbers for the report, the details nested."""
    dtype = getattr(torch, args.dtype)
    layers = layer_sizes(decoder, dtype)
    mha_per_token, _ = cache_growth(mha_counterpart(decoder), dtype)
    mha_all_layers = len(layers) * mha_per_token

    def total(key: str) -> int:
        return sum(layer[key] for layer in layers)

    peak, peak_kind = peak_memory(args.device)
    audio = sum(u["audio_seconds"] for u in utterances)
    largest = max(utterances, key=lambda u: u["beam_bytes"])
    first = decoder.decoders[0]
    return {
        "rtf": sum(u["decode_seconds"] for u in utterances) / audio,
        "decode_seconds_per_utterance": mean(u["decode_seconds"] for u in utterances),
        "search_seconds_per_utterance": mean(u["search_seconds"] for u in utterances),
        "kv_cache_bytes": largest["beam_bytes"],
        "kv_cache_ratio_to_mha": largest["ratio_to_mha"],
        "self_cache_bytes_per_token": total("self_bytes_per_token"),
        "self_cache_fixed_bytes": total("self_fixed_bytes"),
        "cross_cache_bytes_per_frame": total("cross_bytes_per_frame"),
        "self_cache_ratio_to_mha": total("self_bytes_per_token") / mha_all_layers,
        "cross_cache_ratio_to_mha": total("cross_bytes_per_frame") / mha_all_layers,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "utterances": len(utterances),
        "audio_seconds": audio,
        "cache_measured_equals_analytic": all(u["measured_equals_analytic"] for u in utterances),
        "model": {
            "config": str(args.asr_train_config),
            "weights": str(args.asr_model_file),
            "decoder": getattr(speech2text.asr_train_args, "decoder", None),
            "decoder_conf": getattr(speech2text.asr_train_args, "decoder_conf", {}),
            "layers": len(layers),
            "d_model": first.self_attn.d_model,
            "heads": first.self_attn.n_heads,
            "dtype": args.dtype,
        },
        "layers": layers,
        "mha_bytes_per_token_per_layer": mha_per_token,
        "per_utterance": utterances,
        "settings": {
            "beam_size": args.beam_size,
            "ctc_weight": args.ctc_weight,
            "penalty": args.penalty,
            "maxlenratio": args.maxlenratio,
            "minlenratio": args.minlenratio,
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "warmup": args.warmup,
            "machine": machine_info(args.device),
        },
    }


def print_table(stats: dict) -> None:
    model = stats["model"]
    print(
        f"{model['config']}: {model['layers']} decoder layers, d_model {model['d_model']}, "
        f"{model['heads']} heads, {model['dtype']}"
    )
    print(f"\n{'layer: self / cross, analytic':<34} {'self B/token':>12} {'fixed B':>9}"
          f" {'cross B/frame':>13} {'fixed B':>9}")
    for index, layer in enumerate(stats["layers"], 1):
        kinds = f"{layer['self_attention']} / {layer['cross_attention']}"
        print(f"{index:>5}: {kinds:<27} {layer['self_bytes_per_token']:>12} "
              f"{layer['self_fixed_bytes']:>9} {layer['cross_bytes_per_frame']:>13} "
              f"{layer['cross_fixed_bytes']:>9}")
    mha = stats["mha_bytes_per_token_per_layer"]
    print(f"{'MHA layer of the same size':<34} {mha:>12} {0:>9} {mha:>13} {0:>9}")
    print(f"{'ratio to MHA, all layers':<34} {stats['self_cache_ratio_to_mha']:>12.4g} "
          f"{'':>9} {stats['cross_cache_ratio_to_mha']:>13.4g}")

    print(f"\n{'utterance':<24} {'audio s':>7} {'dec. s':>7} {'beam s':>7} {'RTF':>6}"
          f" {'tok':>4} {'frm':>4}"
          f" {'hyp':>3} {'self B/hyp':>11} {'self beam B':>11} {'cross B':>9} {'vs MHA':>6}  ok")
    for u in stats["per_utterance"]:
        measured = u["measured"]
        print(f"{u['key'][:24]:<24} {u['audio_seconds']:>7.2f} {u['decode_seconds']:>7.3f}"
              f" {u['search_seconds']:>7.3f} {u['rtf']:>6.3f} {u['tokens']:>4} {u['frames']:>4} {u['hypotheses']:>3}"
              f" {measured['self_per_hypothesis']:>11} {measured['self_beam']:>11}"
              f" {measured['cross_beam']:>9} {u['ratio_to_mha']:>6.3f}"
              f"  {'=' if u['measured_equals_analytic'] else 'MISMATCH'}")
    print(
        f"\nRTF {stats['rtf']:.4f} over {stats['utterances']} utterances "
        f"({stats['audio_seconds']:.1f} s of audio), {stats['decode_seconds_per_utterance']:.3f} s "
        f"per utterance ({stats['search_seconds_per_utterance']:.3f} s beam search); largest beam cache {stats['kv_cache_bytes']} B "
        f"({stats['kv_cache_ratio_to_mha']:.3f} of MHA's); peak memory "
        f"{stats['peak_memory_bytes'] / 2**20:.1f} MiB ({stats['peak_memory_kind']})"
    )
    print("(ok: '=' when the measured bytes equal the analytic ones, per hypothesis and beam)")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s")
    logging.getLogger().setLevel(args.log_level.upper())  # also when espnet configured logging
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    set_all_random_seed(args.seed)
    if not 0.0 <= args.ctc_weight < 1.0:
        raise UserError(f"--ctc_weight must be in [0, 1) so that the decoder scores, "
                        f"got {args.ctc_weight}")
    speech2text = Speech2Text(
        asr_train_config=args.asr_train_config,
        asr_model_file=args.asr_model_file,
        device=args.device,
        dtype=args.dtype,
        beam_size=args.beam_size,
        ctc_weight=args.ctc_weight,
        lm_weight=0.0,
        penalty=args.penalty,
        maxlenratio=args.maxlenratio,
        minlenratio=args.minlenratio,
        nbest=1,
    )
    decoder = require_cached_decoder(speech2text, args.asr_train_config)
    fs = sampling_rate(args.fs, speech2text, args.asr_train_config)
    utterances = decode_all(args, speech2text, decoder, fs)
    if not utterances:
        raise UserError(f"no utterance was decoded from {args.data_path_and_name_and_type}")
    stats = summarise(args, speech2text, decoder, utterances)
    print_table(stats)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / STATS_FILE
    write_report(path, stats)
    return stats


if __name__ == "__main__":
    main()
