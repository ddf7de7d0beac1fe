"""Decoding a real test set: the plugin's batched beam search at several batch sizes against
ESPnet's decoding as ``asr_inference`` runs it (one utterance at a time) and, where a second
Python has espnet 202611, that release's own utterance-batched ``BatchBeamSearch``.

Same model, same utterances, same machine, one run: each way decodes the whole set (encoder
included, model loading and one warm-up utterance not), and reports utterances per second, the
real-time factor and peak memory; the 1-best token ids of every way are compared with ESPnet's.
Utterances are batched longest first for every batched way alike. On a noisy machine
``--repeats N`` decodes the set N times in rounds, every way once a round: a row's time is its
median, and its speed-up the median of its ratios to the first row within a round (espnet
202611's rounds run in their own process afterwards, so its speed-up is a ratio of medians).

    python -m espnet_plugin.bin.benchmark_decoding --asr_train_config exp/asr_x/config.yaml \\
        --asr_model_file exp/asr_x/valid.acc.ave.pth --config conf/decode_asr.yaml \\
        --wav_scp dump/raw/test/wav.scp --batch_sizes 1 8 64 --espnet_202611_python .venv312/bin/python
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from espnet2.bin.asr_inference import Speech2Text
from espnet2.tasks.asr import ASRTask
from espnet2.train.dataset import ESPnetDataset

import espnet_plugin  # noqa: F401  (registers the plugin's classes)
from espnet_plugin.benchmarks.kv_cache import PeakMemory, sampling_rate
from espnet_plugin.benchmarks.timing import machine_info, write_report
from espnet_plugin.cli import UserError
from espnet_plugin.decoding import inference


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asr_train_config", required=True)
    parser.add_argument("--asr_model_file", required=True)
    parser.add_argument("--config", help="decoding options (the recipe's decode_asr.yaml)")
    parser.add_argument("--wav_scp", required=True, help="the test set's wav.scp")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--espnet", choices=("true", "false"), default="true",
                        help="also decode with this espnet's own program")
    parser.add_argument("--espnet_202611_python",
                        help="a Python with espnet 202611 and this plugin: its batched search "
                             "too, at the same batch sizes")
    parser.add_argument("--espnet_202611_batch_sizes", type=int, nargs="+",
                        help="its batch sizes (default: --batch_sizes)")
    parser.add_argument("--ngpu", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of decoding the set, every way once a round")
    parser.add_argument("--output_json", default="benchmark_decoding.json")
    parser.add_argument("--worker", choices=("espnet_batched",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1:
        raise UserError(f"--batch_sizes must be 1 or more, got {args.batch_sizes}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be 1 or more, got {args.repeats}")
    return args


def speech2text_of(args, batch_size: int = 1) -> Speech2Text:
    options = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    return Speech2Text(asr_train_config=args.asr_train_config, asr_model_file=args.asr_model_file,
                       device="cuda" if args.ngpu else "cpu", **options,
                       **({"batch_size": batch_size} if batch_size > 1 else {}))


def utterances(args, speech2text: Speech2Text) -> list[tuple[str, torch.Tensor]]:
    """The set's (key, samples), longest first, loaded and preprocessed as decoding does."""
    dataset = ESPnetDataset([(args.wav_scp, "speech", "sound")],
                            preprocess=ASRTask.build_preprocess_fn(speech2text.asr_train_args,
                                                                   False))
    loaded = [(key, torch.as_tensor(dataset[key][1]["speech"]))
              for key in dataset.loader_dict["speech"].keys()]
    return sorted(loaded, key=lambda kv: -len(kv[1]))


def measured(decode, device: str) -> tuple[dict, float, int]:
    """Run ``decode()`` -> {key: token ids}; with its seconds and peak memory."""
    peak = PeakMemory(device)
    peak.reset()
    start = time.perf_counter()
    tokens = decode()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start, peak.peak_bytes()


def in_rounds(ways: list, repeats: int, device: str) -> list[tuple[dict, list[float], int]]:
    """Each of ``ways`` (a ``decode`` each) run once a round, ``repeats`` rounds: its tokens (of
    the last round), seconds of every round and largest peak memory."""
    runs = [[] for _ in ways]
    for _ in range(repeats):
        for decode, done in zip(ways, runs):
            done.append(measured(decode, device))
    return [(done[-1][0], [seconds for _, seconds, _ in done], max(p for _, _, p in done))
            for done in runs]


def espnet_per_utterance(speech2text, utts) -> dict:
    return {key: speech2text(speech)[0][2] for key, speech in utts}


def ours(speech2text, utts, batch_size) -> dict:
    search, why_not = inference.batched_search(speech2text)
    if search is None:
        raise UserError(f"the batched search cannot decode this model: {why_not}")
    decoder = inference.BatchDecoder(speech2text, search, dict(utts).__getitem__)
    found = {}
    keys = [key for key, _ in utts]
    for start in range(0, len(keys), batch_size):
        for key, results in decoder(keys[start:start + batch_size]):
            found[key] = results[0][2]
    return found


def espnet_batched(speech2text, utts, batch_size) -> dict:
    found = {}
    for start in range(0, len(utts), batch_size):
        part = utts[start:start + batch_size]
        for (key, _), results in zip(part, speech2text([speech for _, speech in part])):
            found[key] = results[0][2]
    return found


def row(name: str, tokens: dict, seconds_per_run: list[float], peak: int,
        audio_seconds: float, reference: dict, **extra) -> dict:
    differ = sorted(k for k in reference if tokens.get(k) != reference[k])
    seconds = statistics.median(seconds_per_run)
    return {"decoder": name, **extra, "utterances": len(tokens), "seconds": seconds,
            "seconds_per_run": seconds_per_run,
            "utterances_per_second": len(tokens) / seconds, "rtf": seconds / audio_seconds,
            "peak_memory_bytes": peak, "identical_to_espnet": not differ,
            "differing_utterances": differ}


def paired_speedup(base: dict, other: dict) -> float:
    """The median of ``other``'s ratios to ``base`` within a round (both ran in the same
    rounds)."""
    return statistics.median(
        b / o for b, o in zip(base["seconds_per_run"], other["seconds_per_run"]))


def worker(args) -> None:
    """ESPnet 202611's own batched search (run under that release's Python), as JSON lines."""
    for batch_size in args.espnet_202611_batch_sizes or args.batch_sizes:
        speech2text = speech2text_of(args, batch_size)
        utts = utterances(args, speech2text)
        speech2text([utts[-1][1]] * min(batch_size, 2))  # warm-up
        device = str(speech2text.device)
        [(tokens, seconds, peak)] = in_rounds(
            [lambda: espnet_batched(speech2text, utts, batch_size)], args.repeats, device)
        print(json.dumps({"batch_size": batch_size, "tokens": tokens, "seconds_per_run": seconds,
                          "peak_memory_bytes": peak}))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    speech2text = speech2text_of(args)
    utts = utterances(args, speech2text)
    rate = sampling_rate(None, speech2text, Path(args.asr_train_config))
    audio_seconds = sum(len(s) for _, s in utts) / rate
    device = str(speech2text.device)
    speech2text(utts[-1][1])  # warm-up
    ways = [("espnet_plugin batched", size, lambda size=size: ours(speech2text, utts, size))
            for size in args.batch_sizes]
    if args.espnet == "true":
        ways.insert(0, ("espnet, one utterance at a time", 1,
                        lambda: espnet_per_utterance(speech2text, utts)))
    results = in_rounds([decode for _, _, decode in ways], args.repeats, device)
    reference = results[0][0]
    rows = [row(name, tokens, seconds, peak, audio_seconds, reference, batch_size=size)
            for (name, size, _), (tokens, seconds, peak) in zip(ways, results)]
    for r in rows:
        r["speedup_over_first_row"] = paired_speedup(rows[0], r)
    if args.espnet_202611_python:
        command = [args.espnet_202611_python, "-m", "espnet_plugin.bin.benchmark_decoding",
                   *(argv if argv is not None else sys.argv[1:]), "--worker", "espnet_batched"]
        output = subprocess.run(command, capture_output=True, text=True, check=False)
        if output.returncode != 0:
            raise UserError(f"{args.espnet_202611_python}: the espnet 202611 run failed:\n"
                            + output.stderr[-2000:])
        for line in output.stdout.splitlines():
            if line.startswith("{"):
                result = json.loads(line)
                tokens = {k: list(v) for k, v in result["tokens"].items()}
                rows.append(row("espnet 202611 BatchBeamSearch", tokens,
                                result["seconds_per_run"], result["peak_memory_bytes"],
                                audio_seconds, reference, batch_size=result["batch_size"]))
                rows[-1]["speedup_over_first_row"] = rows[0]["seconds"] / rows[-1]["seconds"]
    report = {"machine": machine_info(device), "asr_model_file": args.asr_model_file,
              "wav_scp": args.wav_scp, "audio_seconds": audio_seconds, "repeats": args.repeats,
              "rows": rows}
    print(f"median of {args.repeats} round(s):")
    print(f"{'decoder':34} {'batch':>5} {'utt/s':>7} {'RTF':>7} {'peak MB':>8} "
          f"{'speed-up':>8} identical")
    for r in rows:
        print(f"{r['decoder']:34} {r['batch_size']:>5} {r['utterances_per_second']:7.2f} "
              f"{r['rtf']:7.4f} {r['peak_memory_bytes'] / 2**20:8.0f} "
              f"{r['speedup_over_first_row']:8.2f} {r['identical_to_espnet']}")
    write_report(args.output_json, report)
    return report
