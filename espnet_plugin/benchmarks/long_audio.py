"""The two ways of decoding long audio compared on utterances longer than ``--min_seconds``:
each utterance decoded whole, in overlapping windows joined on CTC-aligned words, and split at
silences, against its reference transcript.

    python -m espnet_plugin.bin.benchmark_long_audio --model exp/asr_x/packed/asr_x.zip \\
        --wav_scp dump/raw/test/wav.scp --text dump/raw/test/text --min_seconds 20 \\
        --max_seconds 10 --out long_audio.json

Prints a table (WER, and the seconds each took) and writes it, with every hypothesis, as JSON.
Pieces are ``--max_seconds`` long: set it below the utterances' length to measure the methods on
a test set whose utterances the model could still decode whole.
"""

import argparse
import time

import soundfile

from espnet_plugin.benchmarks.timing import machine_info, write_report
from espnet_plugin.cli import UserError
from espnet_plugin.recipe.kaldi_data import read_table, read_text
from espnet_plugin.recipe.report import text_table
from espnet_plugin.recipe.score import score
from espnet_plugin.transcribe import LONG_AUDIO, add_arguments, from_arguments

METHODS = ("whole", *LONG_AUDIO)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m espnet_plugin.bin.benchmark_long_audio",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--wav_scp", required=True)
    parser.add_argument("--text", required=True, help="the reference transcripts")
    parser.add_argument("--min_seconds", type=float, default=20.0,
                        help="only utterances longer than this")
    parser.add_argument("--out", default="long_audio.json")
    add_arguments(parser)
    return parser


def main(argv=None) -> None:
    args, decode_args = get_parser().parse_known_args(argv)
    audio = read_table(args.wav_scp, value_name="audio path", sorted_ids=False)
    refs = read_text(args.text)
    long = [(key, path) for key, path in audio.items()
            if soundfile.info(path).duration > args.min_seconds]
    if not long:
        raise UserError(f"--wav_scp {args.wav_scp}: no utterance longer than --min_seconds "
                        f"{args.min_seconds}")
    missing = [key for key, _ in long if key not in refs]
    if missing:
        raise UserError(f"--text {args.text}: no transcript of {', '.join(missing[:5])}")
    transcriber = from_arguments(args, decode_args)
    rows, report = [], {"machine": machine_info(args.device), "utterances": len(long),
                        "min_seconds": args.min_seconds, "max_seconds": args.max_seconds,
                        "overlap_seconds": args.overlap_seconds, "methods": {}}
    for method in METHODS:
        transcriber.long_audio = "windows" if method == "whole" else method
        transcriber.max_seconds = float("inf") if method == "whole" else args.max_seconds
        start = time.perf_counter()
        hyps = {t.key: "" if t.error else t.text for t in transcriber.transcribe(long)}
        seconds = time.perf_counter() - start
        result = score({k: refs[k] for k, _ in long}, hyps)
        report["methods"][method] = {"wer": result.error_rate, "seconds": seconds,
                                     "hypotheses": hyps}
        rows.append([method, f"{result.error_rate:.1f}", f"{seconds:.1f}"])
    print(f"{len(long)} utterances longer than {args.min_seconds} s; pieces of at most "
          f"{args.max_seconds} s")
    print(text_table(["method", "WER %", "seconds"], rows, [False, True, True]))
    write_report(args.out, report)
