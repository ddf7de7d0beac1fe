"""`python -m espnet_plugin.bin.benchmark_kv_batch`: the decoder's KV cache as a user meets it:
utterances per second and peak decoding memory against batch size, per attention type, and the
largest batch that fits a memory budget.

Each model (a training config with random weights, as ESPnet's ASRTask builds it, or a trained
config.yaml with its weights) decodes the same real utterances with the plugin's
``BatchedBeamSearch`` (:mod:`espnet_plugin.decoding.inference`: each utterance encoded alone, the
batch searched at once), longest first: batch size B decodes the B longest utterances, so batch 1
is the longest utterance alone. ``--seconds S`` makes every utterance exactly S seconds long by
joining the wav.scp's recordings end to end. A random decoder's end of sentence is arbitrary: such
a model decodes ``--tokens_per_second`` tokens per second of audio with <eos> held back (as
``benchmark_chunking`` does), so every attention type makes the same number of steps.

Peak decoding memory is the peak over the search's steps of the state it keeps between steps,
measured on its tensors: the decoder's caches (self-attention caches of every hypothesis with
their spare room, cross-attention memories of every utterance) and the CTC prefix scorer's
posteriors and forward variables. The cache bytes in use are checked against the attention
variants' analytic sizes at every step. On a GPU the budget is held against
``torch.cuda.max_memory_allocated`` instead (everything, the encoder included); on a CPU the
process's peak resident memory is reported beside, too coarse to compare attention types.
"""

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import humanfriendly
import numpy as np
import soundfile
import torch
import yaml
from espnet2.bin.asr_inference import Speech2Text
from espnet2.fileio.read_text import read_2columns_text

import espnet_plugin  # noqa: F401  (registers the plugin's classes)
from espnet_plugin.benchmarks.chunking import (
    hold_back_eos,
    random_weight_config,
    read_wave,
    warnings_silenced,
)
from espnet_plugin.benchmarks.kv_cache import (
    DECODING,
    PeakMemory,
    decoding_options,
    held_bytes,
)
from espnet_plugin.benchmarks.timing import machine_info, synchronize, write_report
from espnet_plugin.cli import UserError
from espnet_plugin.decoding import inference
from espnet_plugin.hooks import intercepted
from espnet_plugin.nets.attention import GrowingCache, cache_nbytes
from espnet_plugin.nets.transformer_decoder import BeamState
from espnet_plugin.recipe.report_plots import throughput_and_memory

MB = 2**20
CONFIGS = Path(__file__).resolve().parents[2] / "egs2" / "librispeech_100" / "asr1" / "conf"
DEFAULT_CONFIGS = [CONFIGS / "tuning" / f"train_asr_conformer_{attention}.yaml"
                   for attention in ("mha", "mla", "gqa", "linear")]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    add = parser.add_argument
    add("--asr_train_config", type=Path, nargs="+", default=DEFAULT_CONFIGS,
        help="training configs (random weights) or trained config.yaml files; default: the "
             "LibriSpeech-100 Conformer MHA, MLA, GQA and linear-attention configs")
    add("--asr_model_file", type=Path, nargs="+", default=None,
        help="the trained weights of each config, in the same order; none: random weights")
    add("--wav_scp", type=Path, required=True, help="real utterances (Kaldi wav.scp)")
    add("--seconds", type=float, default=None,
        help="decode utterances of exactly this length, joined from the wav.scp's recordings")
    add("--max_utterances", type=int, default=None, help="read only the first N of the wav.scp")
    add("--fs", default="16k", help="the audio's sampling rate (16000, 16k)")
    add("--batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    add("--memory_budget_mb", type=float, default=None,
        help="report the largest batch whose peak decoding memory is within this many MB")
    add("--inference_config", type=Path, default=CONFIGS / "decode_asr.yaml",
        help="decoding options (beam_size, ctc_weight, ...)")
    for name, default in DECODING.items():
        add(f"--{name}", type=type(default), default=None, help="overrides the inference config")
    add("--tokens_per_second", type=float, default=None,
        help="decode exactly this many tokens per second of audio (<eos> held back); default: "
             "the model's own ending for trained weights, 3 for random ones")
    add("--vocab_size", type=int, default=5000, help="token list size for random weights")
    add("--repeats", type=int, default=1, help="timed decodes per batch; the median counts")
    add("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    add("--device", default="cpu")
    add("--seed", type=int, default=0, help="random weights' seed")
    add("--log_level", default="WARNING")
    add("--output", type=Path, default=Path("benchmark_kv_batch.json"))
    add("--plot", type=Path, default=None, help="draw throughput and memory against batch here")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # asr_inference options that do not change what is decoded (asr.sh passes them)
        logging.warning(f"ignoring options this benchmark does not use: {' '.join(unknown)}")
    args.fs = int(humanfriendly.parse_size(args.fs))
    args.lm_file = None  # decoding_options: no language model is fused here
    if min(args.batch_sizes) < 1:
        raise UserError(f"--batch_sizes must be 1 or more, got {args.batch_sizes}")
    if args.memory_budget_mb is not None and args.memory_budget_mb <= 0:
        raise UserError(f"--memory_budget_mb must be positive, got {args.memory_budget_mb}")
    if args.asr_model_file is not None and len(args.asr_model_file) != len(args.asr_train_config):
        raise UserError(f"--asr_model_file: {len(args.asr_model_file)} files for "
                        f"{len(args.asr_train_config)} --asr_train_config")
    if args.seconds is not None and args.seconds <= 0:
        raise UserError(f"--seconds must be positive, got {args.seconds}")
    return args


class SearchState:
    """The state a ``BatchedBeamSearch`` keeps between steps, measured on its tensors.

    Inside ``with``, the decoder's ``step_beams`` (its caches just grown) and the search's
    ``_select`` (every scorer's state before pruning) are watched. ``peak`` is the largest sum of
    the decoder's and the CTC scorer's held bytes (distinct storages, spare room included) seen;
    ``exact`` whether the decoder's cache bytes in use always equalled the analytic ones.
    """

    def __init__(self, search):
        self.search = search
        self.reset()

    def reset(self) -> None:
        self.held = {"decoder": 0, "ctc": 0}
        self.peaks = {"decoder": 0, "ctc": 0, "total": 0}
        self.exact, self.steps, self.cache_bytes, self.analytic_bytes = True, 0, 0, 0

    def __enter__(self) -> "SearchState":
        self.hooks = [intercepted(self.search, "_select", self._selected)]
        if self.search.decoder is not None:
            self.hooks.append(intercepted(self.search.decoder, "step_beams", self._stepped))
        for hook in self.hooks:
            hook.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        for hook in reversed(self.hooks):
            hook.__exit__(*exc_info)

    def _stepped(self, arguments: dict, result) -> None:
        state = arguments["state"]
        self.steps += 1
        self.cache_bytes, self.analytic_bytes = decoder_cache_bytes(state), analytic_bytes(
            self.search.decoder, state)
        self.exact &= self.cache_bytes == self.analytic_bytes
        self._update("decoder", decoder_held_bytes(state))

    def _selected(self, arguments: dict, result) -> None:
        ctc = arguments["ctc"]
        if ctc is not None:
            self._update("ctc", held_bytes(ctc.tensors()))

    def _update(self, part: str, nbytes: int) -> None:
        self.held[part] = nbytes
        self.peaks[part] = max(self.peaks[part], nbytes)
        self.peaks["total"] = max(self.peaks["total"], sum(self.held.values()))


def _in_use(cache):
    return cache.view() if isinstance(cache, GrowingCache) else cache


def decoder_cache_bytes(state: BeamState) -> int:
    """Bytes of the caches' entries in use: every hypothesis' self-attention cache, every
    utterance's cross-attention memory (no spare room, no masks)."""
    return (sum(cache_nbytes(_in_use(cache)) for cache in state.caches)
            + sum(cache_nbytes(memory.cache) for memory in state.memories))


def decoder_held_bytes(state: BeamState) -> int:
    """Bytes the decoder's state keeps allocated: its caches' storages, spare room included, and
    the memories' masks."""
    tensors = []
    for cache in state.caches:
        tensors += cache.tensors if isinstance(cache, GrowingCache) else list(cache)
    for memory in state.memories:
        tensors += [*memory.cache, *([] if memory.mask is None else [memory.mask])]
    return held_bytes(tensors)


def analytic_bytes(decoder, state: BeamState) -> int:
    """What the attention variants say ``state`` holds: per hypothesis the self-attention caches
    of its prefix, per utterance the cross-attention memories of its padded frames."""
    memory = state.memories[0].cache
    dtype, hypotheses, utterances = memory[0].dtype, _rows(state.caches[0]), memory[0].size(0)
    frames = 0 if memory.time_dim is None else memory[0].size(memory.time_dim)
    return sum(hypotheses * layer.self_attn.cache_bytes(state.length, dtype)
               + utterances * layer.src_attn.cache_bytes(frames, dtype)
               for layer in decoder.decoders)


def _rows(cache) -> int:
    return (cache.tensors if isinstance(cache, GrowingCache) else cache)[0].size(0)


def largest_batch_within(rows: list[dict], budget_bytes: float) -> Optional[int]:
    """The largest measured batch size whose peak decoding memory is within the budget."""
    fitting = [r["batch_size"] for r in rows if r["peak_bytes"] <= budget_bytes]
    return max(fitting, default=None)


def check_budget(row: dict, budget_mb: Optional[float], model: str) -> None:
    """Bad input: a budget that even the longest utterance, decoded alone, exceeds."""
    if budget_mb is not None and row["batch_size"] == 1 and row["peak_bytes"] > budget_mb * MB:
        raise UserError(
            f"--memory_budget_mb {budget_mb:g}: the longest utterance alone, {row['keys'][0]} "
            f"({row['audio_seconds']:.1f} s), takes {row['peak_bytes'] / MB:.1f} MB to decode "
            f"with {model}"
        )


def joined_utterances(waves: dict[str, np.ndarray], seconds: float, fs: int,
                      count: int) -> dict[str, np.ndarray]:
    """``count`` utterances of exactly ``seconds``, the recordings joined end to end in turn
    (each utterance starts where the previous one stopped)."""
    length = round(seconds * fs)
    stream = np.concatenate(list(waves.values()))
    repeats = -(-length * count // len(stream))
    stream = np.tile(stream, repeats)
    return {f"joined{i:03d}_{seconds:g}s": stream[i * length:(i + 1) * length]
            for i in range(count)}


def load(config: Path, weights: Optional[Path], args, folder: Path) -> Speech2Text:
    """Speech2Text of a trained model or of random weights from a training config, with the
    decoding options; <eos> held back where the number of tokens is fixed."""
    if not config.is_file():
        raise UserError(f"--asr_train_config {config}: no such file")
    if (yaml.safe_load(config.read_text()) or {}).get("token_list") is None:
        if weights is not None:
            raise UserError(f"{config} has no token_list: with --asr_model_file, pass the "
                            "config.yaml that training saved next to it")
        config = random_weight_config(config, args.vocab_size, folder)
    torch.manual_seed(args.seed)
    speech2text = Speech2Text(asr_train_config=config, asr_model_file=weights,
                              device=args.device, nbest=1, **decoding_options(args))
    if args.tokens_per_second is not None:
        hold_back_eos(speech2text)
    return speech2text


def measure_batch(decoder: inference.BatchDecoder, state: SearchState, keys: list[str],
                  audio_seconds: float, steps: Optional[int], repeats: int) -> dict:
    """Decode ``keys`` as one batch ``repeats`` times: median time, peaks, tokens decoded."""
    device = decoder.speech2text.device
    times, tokens = [], []
    decoder.peak.reset()
    state.reset()
    for _ in range(repeats):
        synchronize(torch.device(device))
        start = time.perf_counter()
        with warnings_silenced(steps is not None):
            results = list(decoder(keys))
        synchronize(torch.device(device))
        times.append(time.perf_counter() - start)
        tokens = [len(r[0][3].yseq) - 2 for _, r in results]
    if steps is not None and set(tokens) != {steps}:
        raise RuntimeError(f"decoding made {sorted(set(tokens))} steps instead of {steps}")
    seconds = statistics.median(times)
    on_gpu = str(device).startswith("cuda")
    process_peak = decoder.peak.peak_bytes()
    return {
        "batch_size": len(keys), "keys": keys, "audio_seconds": audio_seconds,
        "seconds": seconds, "utterances_per_second": len(keys) / seconds,
        "rtf": seconds / audio_seconds, "steps": state.steps // repeats,
        "tokens_per_utterance": statistics.mean(tokens),
        "decoder_cache_bytes": state.cache_bytes, "analytic_cache_bytes": state.analytic_bytes,
        "cache_equals_analytic": state.exact,
        "decoder_state_peak_bytes": state.peaks["decoder"],
        "ctc_state_peak_bytes": state.peaks["ctc"],
        "search_state_peak_bytes": state.peaks["total"],
        "process_peak_bytes": process_peak, "process_peak_kind": decoder.peak.kind,
        "peak_bytes": process_peak if on_gpu else state.peaks["total"],
    }


def measure_model(speech2text: Speech2Text, audio: dict[str, np.ndarray], fs: int,
                  batch_sizes: Sequence[int], args, name: str) -> dict:
    """Every batch size of one model, smallest first, its utterances the longest first."""
    search, why_not = inference.batched_search(speech2text)
    if search is None:
        raise UserError(f"{name}: the batched search cannot decode this model: {why_not}")
    waves = {key: torch.from_numpy(wave) for key, wave in audio.items()}
    keys = sorted(waves, key=lambda k: -len(waves[k]))
    decoder = inference.BatchDecoder(speech2text, search, waves.__getitem__)
    rows = []
    with SearchState(search) as state:
        warm_up = keys[-1:]
        set_steps(speech2text, audio, warm_up, fs, args.tokens_per_second)
        with warnings_silenced(args.tokens_per_second is not None):
            list(decoder(warm_up))
        # A budget is checked on the longest utterance alone first: batch 1.
        checked = {1} if args.memory_budget_mb is not None else set()
        for batch_size in sorted(set(batch_sizes) | checked):
            batch = [keys[i % len(keys)] for i in range(batch_size)]
            steps = set_steps(speech2text, audio, batch, fs, args.tokens_per_second)
            seconds = sum(len(audio[k]) for k in batch) / fs
            row = measure_batch(decoder, state, batch, seconds, steps, args.repeats)
            check_budget(row, args.memory_budget_mb, name)
            if batch_size in batch_sizes:
                rows.append(row)
                print_row(name, row)
    budget = args.memory_budget_mb
    return {"model": name, "rows": rows, "memory_budget_mb": budget,
            "largest_batch_within_budget":
                None if budget is None else largest_batch_within(rows, budget * MB)}


def set_steps(speech2text: Speech2Text, audio: dict, keys: list[str], fs: int,
              tokens_per_second: Optional[float]) -> Optional[int]:
    """Fix the batch's decoding steps from its longest utterance (None: the model's ending)."""
    if tokens_per_second is None:
        return None
    steps = max(1, round(max(len(audio[k]) for k in keys) / fs * tokens_per_second))
    speech2text.maxlenratio = -steps
    return steps


HEADER = (f"{'model':<26} {'batch':>5} {'utt/s':>7} {'RTF':>7} {'cache MB':>9} {'decoder MB':>10}"
          f" {'CTC MB':>7} {'state MB':>9} {'process MB':>10} {'=':>2}")


def print_row(name: str, row: dict) -> None:
    print(f"{name[-26:]:<26} {row['batch_size']:>5} {row['utterances_per_second']:>7.3f}"
          f" {row['rtf']:>7.4f} {row['decoder_cache_bytes'] / MB:>9.1f}"
          f" {row['decoder_state_peak_bytes'] / MB:>10.1f} {row['ctc_state_peak_bytes'] / MB:>7.1f}"
          f" {row['search_state_peak_bytes'] / MB:>9.1f} {row['process_peak_bytes'] / MB:>10.0f}"
          f" {'=' if row['cache_equals_analytic'] else '!':>2}", flush=True)


def print_summary(models: list[dict]) -> None:
    print("\ncache MB: the decoder's caches in use at the last step (= analytic when '='); "
          "decoder, CTC, state MB: peaks of what the search keeps between steps, spare room "
          "included; process MB: the process's peak (see the JSON's process_peak_kind)")
    for model in models:
        if model["memory_budget_mb"] is not None:
            print(f"{model['model']}: largest batch within {model['memory_budget_mb']:g} MB: "
                  f"{model['largest_batch_within_budget']}")


def utterance_set(args) -> dict[str, np.ndarray]:
    """The utterances the largest batch decodes: the wav.scp's longest (only those are loaded),
    or with ``--seconds`` utterances of that length joined from its recordings in order."""
    paths = list(read_2columns_text(args.wav_scp).items())[: args.max_utterances]
    if not paths:
        raise UserError(f"--wav_scp {args.wav_scp} lists no utterance")
    count = max(args.batch_sizes)
    if args.seconds is None:
        frames = {key: soundfile.info(path).frames for key, path in paths}
        paths = sorted(paths, key=lambda kv: -frames[kv[0]])[:count]
        return {key: read_wave(key, path, args.fs) for key, path in paths}
    audio, needed = {}, args.seconds * args.fs * count
    for key, path in paths:
        audio[key] = read_wave(key, path, args.fs)
        needed -= len(audio[key])
        if needed <= 0:
            break
    return joined_utterances(audio, args.seconds, args.fs, count)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.getLogger().setLevel(args.log_level.upper())  # also when espnet configured logging
    if args.threads:
        torch.set_num_threads(args.threads)
    audio = utterance_set(args)
    weights = args.asr_model_file or [None] * len(args.asr_train_config)
    if args.tokens_per_second is None and args.asr_model_file is None:
        args.tokens_per_second = 3.0
    print(HEADER)
    models = []
    with tempfile.TemporaryDirectory() as folder:
        for config, model_file in zip(args.asr_train_config, weights):
            speech2text = load(config, model_file, args, Path(folder))
            models.append(measure_model(speech2text, audio, args.fs, args.batch_sizes, args,
                                        config.stem))
            del speech2text
    print_summary(models)
    report = {
        "machine": machine_info(args.device),
        "settings": {**decoding_options(args), "tokens_per_second": args.tokens_per_second,
                     "seconds": args.seconds, "wav_scp": str(args.wav_scp),
                     "utterances": len(audio), "repeats": args.repeats,
                     "vocab_size": args.vocab_size if args.asr_model_file is None else None,
                     "weights": "random" if args.asr_model_file is None else "trained"},
        "models": models,
    }
    write_report(args.output, report)
    if args.plot is not None:
        throughput_and_memory({m["model"]: m["rows"] for m in models}, args.plot,
                              args.memory_budget_mb)
        print(f"wrote {args.plot}")
    return report
