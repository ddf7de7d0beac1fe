"""`python -m espnet_plugin.bin.benchmark_chunking`: what dynamic chunking saves in decoding.

Decodes real speech with ESPnet's Speech2Text (its BatchBeamSearch with CTC prefix scoring) three
ways: the model as it is ("chunked"), the same weights with the chunking stage bypassed
("bypassed": every block sees every frame, like the model without chunking), and optionally a
separately trained baseline model ("baseline"). Per utterance it times the encoder alone on the
model's own features and the whole decoding (front end, encoder, beam search), the ways running
in turn within each repeat so that load from other processes falls on all alike; the median
counts. The achieved compression is the kept frames over the frames entering the chunking stage.
A separate pass with forward hooks splits the encoder's time (chunked and bypassed) into its
subsampling, its blocks before the chunking stage (always at the full frame rate), the stage
itself with the rest, and its blocks after the stage.

Without ``--asr_model_file`` the model gets random weights from a training config (a recipe's
``conf/tuning/*.yaml`` with a made-up vocabulary): the router starts at the identity, so its
compression is whatever the data give. A random decoder's end of sentence is arbitrary, so such a
model decodes a fixed number of tokens per second of audio (``--tokens_per_second``), the same in
every way, with <eos> held back until then.
"""

import argparse
import logging
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml
from espnet2.bin.asr_inference import Speech2Text
from espnet2.fileio.read_text import read_2columns_text
from espnet2.fileio.sound_scp import soundfile_read
from espnet2.tasks.asr import ASRTask

import espnet_plugin  # noqa: F401  (registers the plugin's classes)
from espnet_plugin.asr_model import FullRateCTC
from espnet_plugin.benchmarks.timing import machine_info, median_ms_side_by_side, write_report
from espnet_plugin.cli import UserError
from espnet_plugin.nets.aux_loss import collect_aux

# Token ids reserved by ESPnet's token lists: blank first, unknown second, <sos/eos> last.
SPECIAL_TOKENS = ("<blank>", "<unk>", "<sos/eos>")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--asr_train_config", type=Path, required=True,
        help="config.yaml of a trained model, or a training config for random weights")
    add("--asr_model_file", type=Path, default=None, help="trained weights; none: random weights")
    add("--baseline_asr_train_config", type=Path, default=None,
        help="also decode this model (e.g. the same recipe without chunking)")
    add("--baseline_asr_model_file", type=Path, default=None)
    add("--wav_scp", type=Path, required=True,
        help="utterances to decode (Kaldi wav.scp, e.g. a recipe's dump/raw/test/wav.scp)")
    add("--max_utterances", type=int, default=None)
    add("--fs", type=int, default=16000, help="sample rate the models expect (LibriSpeech: 16000)")
    add("--vocab_size", type=int, default=5000, help="token list size for random weights")
    add("--tokens_per_second", type=float, default=None,
        help="decode exactly this many tokens per second of audio; default: the model's own "
             "ending for trained weights, 3 (about BPE-5000's rate in read speech) for random")
    add("--beam_size", type=int, default=10)
    add("--ctc_weight", type=float, default=0.3)
    add("--repeats", type=int, default=3, help="timed runs per measurement after a warm-up")
    add("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to run")
    add("--device", default="cpu")
    add("--seed", type=int, default=0, help="random weights' seed")
    add("--output", type=Path, default=Path("benchmark_chunking.json"))
    args = parser.parse_args(argv)
    if args.tokens_per_second is None and args.asr_model_file is None:
        args.tokens_per_second = 3.0
    return args


def random_weight_config(train_config: Path, vocab_size: int, folder: Path) -> Path:
    """A complete config (ESPnet's defaults + ``train_config``) whose token list is made up."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise UserError(f"--vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    args = ASRTask.get_parser().parse_args(["--config", str(train_config), "--token_type", "word"])
    words = [f"token{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    args.token_list = [SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], *words, SPECIAL_TOKENS[2]]
    path = folder / f"random_{train_config.stem}.yaml"
    path.write_text(yaml.safe_dump(vars(args)))
    return path


def load_model(train_config: Path, model_file: Optional[Path], args, folder: Path) -> Speech2Text:
    """Speech2Text of a trained model, or of random weights when ``model_file`` is None."""
    if not train_config.is_file():
        raise FileNotFoundError(f"no config file {train_config}")
    if yaml.safe_load(train_config.read_text()).get("token_list") is None:
        if model_file is not None:
            raise UserError(f"{train_config} has no token_list: with --asr_model_file, pass the "
                             "config.yaml that training saved next to it")
        train_config = random_weight_config(train_config, args.vocab_size, folder)
    torch.manual_seed(args.seed)
    speech2text = Speech2Text(
        asr_train_config=train_config, asr_model_file=model_file, device=args.device,
        beam_size=args.beam_size, ctc_weight=args.ctc_weight, lm_weight=0.0, nbest=1,
    )
    if args.tokens_per_second is not None:
        hold_back_eos(speech2text)
    return speech2text


def hold_back_eos(speech2text: Speech2Text) -> None:
    """The decoder never proposes <eos>: the search then ends at its maximum length only."""
    model = speech2text.asr_model
    layer = getattr(model.decoder, "output_layer", None)
    if layer is None or layer.bias is None:
        raise UserError(f"--tokens_per_second needs a decoder with a biased output_layer; "
                         f"{type(model.decoder).__name__} has none")
    with torch.no_grad():
        layer.bias[model.eos] = -1e4


@contextmanager
def chunking_bypassed(encoder: torch.nn.Module, ctc: Optional[torch.nn.Module] = None):
    """The encoder without its chunking stage: the same weights, every frame through every block.
    A ``ctc`` that reads the stage's full-rate output (``output: ctc_dechunked``) reads the
    encoder's output instead, which is then full-rate."""
    stage, encoder.chunking = encoder.chunking, None
    reads_stage = isinstance(ctc, FullRateCTC)
    if reads_stage:
        ctc.full_rate = lambda hs_pad, hlens=None: (hs_pad, hlens)
    try:
        yield
    finally:
        encoder.chunking = stage
        if reads_stage:
            ctc.full_rate = stage.full_rate


@contextmanager
def warnings_silenced(silenced: bool):
    """Fixed-length decoding makes the search warn that it reached its maximum length: it must."""
    previous = logging.root.manager.disable
    if silenced:
        logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def read_wave(key: str, path: str, fs: int) -> np.ndarray:
    """The waveform of utterance ``key``, refused unless it is mono at ``fs`` (--fs)."""
    wave, rate = soundfile_read(path, dtype=np.float32)
    if rate != fs or wave.ndim != 1:
        raise UserError(f"{path} ({key}) is {rate} Hz with shape {wave.shape}, "
                         f"expected {fs} Hz mono (--fs)")
    return wave


def read_utterances(args) -> dict[str, np.ndarray]:
    """Utterance id -> waveform at --fs, from --wav_scp."""
    utterances = {key: read_wave(key, path, args.fs)
                  for key, path in list(read_2columns_text(args.wav_scp).items())[
                      : args.max_utterances]}
    if not utterances:
        raise UserError(f"--wav_scp {args.wav_scp} lists no utterance")
    return utterances


def encoder_input(speech2text: Speech2Text, wave: np.ndarray):
    """The model's own features of one utterance (front end, normalisation): the encoder's input."""
    model = speech2text.asr_model
    speech = torch.from_numpy(wave)[None].to(speech2text.device)
    lengths = torch.tensor([speech.size(1)], device=speech.device)
    with torch.no_grad():
        feats, feat_lengths = model.frontend(speech, lengths)
        if model.normalize is not None:
            feats, feat_lengths = model.normalize(feats, feat_lengths)
    return feats, feat_lengths


def compression(encoder, feats, feat_lengths) -> tuple[int, int]:
    """(kept, frames) of one utterance: frames entering the chunking stage and those it keeps,
    from the stage's own record of its compression."""
    with torch.no_grad():
        collect_aux(encoder)
        with chunking_bypassed(encoder):
            frames = int(encoder(feats, feat_lengths)[1][0])
        encoder(feats, feat_lengths)
    ratio = collect_aux(encoder).stats["chunking.compression"]
    return round(float(ratio) * frames), frames


def decoded_tokens(speech2text: Speech2Text, wave: np.ndarray) -> int:
    """Decoding steps of the best hypothesis: its tokens without <sos> and <eos>."""
    (*_, best), *_ = speech2text(wave)
    return len(best.yseq) - 2


# The ways with a chunking stage, whose encoder time is split into parts.
CHUNKING_WAYS = ("chunked", "bypassed")


class Way:
    """One way of decoding: a Speech2Text, and whether its chunking stage is bypassed."""

    def __init__(self, speech2text: Speech2Text, bypass: bool):
        self.speech2text = speech2text
        self.encoder = speech2text.asr_model.encoder
        self.bypass = bypass

    @contextmanager
    def active(self):
        if self.bypass:
            with chunking_bypassed(self.encoder, self.speech2text.asr_model.ctc):
                yield
        else:
            yield

    def calls(self, wave: np.ndarray, steps: Optional[int]):
        """(encoder call, decoding call) of one utterance; ``steps`` tokens exactly if given."""
        feats, feat_lengths = encoder_input(self.speech2text, wave)
        self.speech2text.maxlenratio = 0.0 if steps is None else -steps

        def encode():
            with self.active(), torch.no_grad():
                self.encoder(feats, feat_lengths)

        def decode():
            with self.active(), warnings_silenced(steps is not None):
                self.tokens = decoded_tokens(self.speech2text, wave)

        return encode, decode


ENCODER_PARTS = ("subsampling", "before_router", "router_and_rest", "after_router")


@contextmanager
def part_timers(encoder: torch.nn.Module):
    """While active, adds the wall seconds the encoder spends in its subsampling and in its blocks
    before and after the chunking stage into the dict it yields (forward hooks)."""
    seconds = dict.fromkeys(ENCODER_PARTS[:2] + ENCODER_PARTS[3:], 0.0)
    after = encoder.chunking.after_block
    parts = [(encoder.embed, "subsampling")] + [
        (block, "before_router" if index < after else "after_router")
        for index, block in enumerate(encoder.blocks)
    ]
    started = {}
    handles = []
    for module, part in parts:
        def pre(module, args):
            started[module] = time.perf_counter()

        def post(module, args, output, part=part):
            seconds[part] += time.perf_counter() - started.pop(module)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


def encoder_parts(way: "Way", wave: np.ndarray, repeats: int) -> dict[str, float]:
    """Median milliseconds of each encoder part (ENCODER_PARTS) of one way on one utterance;
    "router_and_rest" is the encoder's time outside the hooked parts."""
    feats, feat_lengths = encoder_input(way.speech2text, wave)
    samples = []
    with part_timers(way.encoder) as seconds, way.active(), torch.no_grad():
        for _ in range(repeats + 1):  # the first is a warm-up
            seconds.update(dict.fromkeys(seconds, 0.0))
            start = time.perf_counter()
            way.encoder(feats, feat_lengths)
            total = time.perf_counter() - start
            samples.append({**seconds, "router_and_rest": total - sum(seconds.values())})
    return {part: statistics.median(s[part] for s in samples[1:]) * 1e3 for part in ENCODER_PARTS}


def time_utterance(ways: dict[str, Way], wave: np.ndarray, steps: Optional[int], args) -> dict:
    """Median encoder and decoding milliseconds of each way, and the tokens each decoded."""
    calls = {name: way.calls(wave, steps) for name, way in ways.items()}
    device = torch.device(args.device)
    encoder_ms = median_ms_side_by_side({n: c[0] for n, c in calls.items()}, device, args.repeats)
    decode_ms = median_ms_side_by_side({n: c[1] for n, c in calls.items()}, device, args.repeats)
    tokens = {name: way.tokens for name, way in ways.items()}
    if steps is not None and set(tokens.values()) != {steps}:
        raise RuntimeError(f"decoding made {tokens} steps instead of {steps}")
    parts = {name: encoder_parts(ways[name], wave, args.repeats) for name in CHUNKING_WAYS}
    return {"encoder_ms": encoder_ms, "decode_ms": decode_ms, "tokens": tokens,
            "encoder_parts_ms": parts}


def totals_and_speedups(rows: list[dict], names: Sequence[str]) -> dict:
    totals = {key: {n: sum(r[key][n] for r in rows) for n in names}
              for key in ("encoder_ms", "decode_ms")}
    totals["encoder_parts_ms"] = {
        n: {part: sum(r["encoder_parts_ms"][n][part] for r in rows) for part in ENCODER_PARTS}
        for n in CHUNKING_WAYS
    }
    speedup = {key[: -len("_ms")]: {n: totals[key][n] / totals[key]["chunked"]
                                    for n in names if n != "chunked"}
               for key in ("encoder_ms", "decode_ms")}
    return {"totals": totals, "speedup": speedup}


def load_ways(args) -> dict[str, Way]:
    """The chunked model, the same with chunking bypassed and, if given, the baseline model."""
    with tempfile.TemporaryDirectory() as folder:
        model = load_model(args.asr_train_config, args.asr_model_file, args, Path(folder))
        if getattr(model.asr_model.encoder, "chunking", None) is None:
            raise UserError(f"{args.asr_train_config}: the encoder has no dynamic chunking stage "
                             "(encoder_conf: dynamic_chunking)")
        ways = {"chunked": Way(model, bypass=False), "bypassed": Way(model, bypass=True)}
        if args.baseline_asr_train_config is not None:
            baseline = load_model(args.baseline_asr_train_config, args.baseline_asr_model_file,
                                  args, Path(folder))
            ways["baseline"] = Way(baseline, bypass=False)
    return ways


def describe(key: str, wave: np.ndarray, model: Speech2Text, args) -> dict:
    """An utterance's length, its compression, and its decoding steps if they are fixed."""
    kept, frames = compression(model.asr_model.encoder, *encoder_input(model, wave))
    seconds = len(wave) / args.fs
    steps = None
    if args.tokens_per_second is not None:
        steps = max(1, round(seconds * args.tokens_per_second))
    return {"utt": key, "seconds": seconds, "frames": frames, "kept": kept, "steps": steps}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    utterances = read_utterances(args)
    ways = load_ways(args)
    model = ways["chunked"].speech2text
    utts = [describe(key, wave, model, args) for key, wave in utterances.items()]
    kept, frames = sum(u["kept"] for u in utts), sum(u["frames"] for u in utts)
    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = [{"utt": u["utt"], **time_utterance(ways, utterances[u["utt"]], u["steps"], args)}
                for u in utts]
        runs.append({"threads": threads, "utterances": rows, **totals_and_speedups(rows, ways)})
    encoder = model.asr_model.encoder
    stage = encoder.chunking
    report = {
        "machine": machine_info(args.device),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {
            "weights": "random" if args.asr_model_file is None else "trained",
            "beam_search": type(model.beam_search).__name__,
            "encoder_blocks": len(encoder.blocks),
            "chunking": {"after_block": stage.after_block, "output": stage.output,
                         "target_ratio": stage.target_ratio,
                         "min_keep_ratio": stage.min_keep_ratio},
        },
        "utterances": utts,
        "compression": {"kept": kept, "frames": frames, "ratio": kept / frames},
        "runs": runs,
    }
    print_report(report)
    print()
    write_report(args.output, report)
    return report


def print_report(report: dict) -> None:
    model, config = report["model"], report["config"]
    chunking = model["chunking"]
    steps = ("the model's own ending" if config["tokens_per_second"] is None
             else f"{config['tokens_per_second']:g} tokens per second of audio")
    print(f"{model['weights']} weights, chunking after block {chunking['after_block']} of "
          f"{model['encoder_blocks']} ({chunking['output']} output), {model['beam_search']} "
          f"beam {config['beam_size']}, CTC weight {config['ctc_weight']}, decoding {steps}")
    c = report["compression"]
    print(f"compression: {c['kept']} of {c['frames']} frames kept = {c['ratio']:.3f} "
          f"(target {chunking['target_ratio']}, at least {chunking['min_keep_ratio']})")
    seconds = {u["utt"]: u for u in report["utterances"]}
    for run in report["runs"]:
        names = list(run["totals"]["encoder_ms"])
        print(f"\n{run['threads']} torch threads, median of {config['repeats']}; "
              f"ms per utterance (tokens decoded)")
        print(f"{'utterance':>20} {'speech':>7} {'kept':>9}"
              + "".join(f" {'enc ' + n:>14}" for n in names)
              + "".join(f" {'dec ' + n:>20}" for n in names))
        for r in run["utterances"]:
            u = seconds[r["utt"]]
            print(f"{r['utt']:>20} {u['seconds']:>6.1f}s {u['kept']:>4}/{u['frames']:<4}"
                  + "".join(f" {r['encoder_ms'][n]:>14.1f}" for n in names)
                  + "".join(f" {r['decode_ms'][n]:>14.1f} ({r['tokens'][n]:>3})" for n in names))
        totals = run["totals"]
        print(f"{'total':>20} {'':>7} {'':>9}"
              + "".join(f" {totals['encoder_ms'][n]:>14.1f}" for n in names)
              + "".join(f" {totals['decode_ms'][n]:>20.1f}" for n in names))
        for key, ratios in run["speedup"].items():
            for name, ratio in ratios.items():
                print(f"{key} time {name} / chunked: {ratio:.2f}")
        print(f"encoder parts, ms over all utterances (blocks 1-{chunking['after_block']} run "
              f"before the router): " + ", ".join(
                  f"{part} {totals['encoder_parts_ms']['chunked'][part]:.1f} chunked / "
                  f"{totals['encoder_parts_ms']['bypassed'][part]:.1f} bypassed"
                  for part in ENCODER_PARTS))


if __name__ == "__main__":
    main()
