"""`python -m espnet_plugin.bin.transcribe --model <zip or exp dir> FILE... | --wav_scp F`:
transcribe audio files with a trained model (:mod:`espnet_plugin.transcribe`).

Prints the text of each FILE on a line of its own, or ``key text`` for each utterance of
``--wav_scp``; ``--output_format json`` prints one JSON object a line instead, with the words and
their times. Options it does not know are ESPnet's decoding options (``--beam_size 10``), on top
of the model's ``decode.yaml``. A file that cannot be transcribed is named on stderr in one line,
the others are still transcribed, and the exit status is 1 at the end.
"""

import argparse
import json
import sys
from dataclasses import asdict

from tqdm import tqdm

from espnet_plugin.cli import UserError, run
from espnet_plugin.transcribe import add_arguments, from_arguments


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m espnet_plugin.bin.transcribe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="audio files (what soundfile reads)")
    parser.add_argument("--wav_scp", help="a Kaldi wav.scp: <key> <audio file> a line")
    parser.add_argument("--output_format", choices=("text", "json"), default="text")
    add_arguments(parser)
    return parser


def inputs(args: argparse.Namespace) -> list:
    from espnet_plugin.recipe.kaldi_data import read_table

    if bool(args.files) == bool(args.wav_scp):
        raise UserError("give audio files or --wav_scp (one of them)")
    if args.wav_scp:
        return list(read_table(args.wav_scp, value_name="audio path", sorted_ids=False).items())
    return [(path, path) for path in args.files]


def main(argv=None) -> None:
    args, decode_args = get_parser().parse_known_args(argv)
    items = inputs(args)
    transcriber = from_arguments(args, decode_args)
    failed = 0
    for result in transcriber.transcribe(items, words=args.output_format == "json",
                                         progress=True):
        if result.error:
            failed += 1
            # The progress bar's own write: the line stays whole under the bar.
            tqdm.write(f"{__spec__.name}: error: {result.error}", file=sys.stderr)
        elif args.output_format == "json":
            record = asdict(result)
            del record["error"]
            print(json.dumps(record), flush=True)
        else:
            print(f"{result.key} {result.text}" if args.wav_scp else result.text, flush=True)
    if failed:
        raise UserError(f"{failed} of {len(items)} files could not be transcribed (named above)")


if __name__ == "__main__":
    run(main)
