"""Stage 6's LM text: the training transcripts once (not once per speed perturbation) and any
number of text corpora, one sentence per line, plain or gzipped, without the sentences of the
evaluation sets (an LM that has read a test sentence would score it too well).

    python -m espnet_plugin.recipe.lm_text --transcripts data/train/text \\
        --text downloads/librispeech-lm-norm.txt.gz --exclude dump/raw/dev/text \\
        --out dump/raw/lm/train.txt

Writes Kaldi text (``lm<number> <sentence>``), streaming: the 800-million-word LibriSpeech LM
corpus never sits in memory. A corpus that is missing, empty or not text (not UTF-8, or NUL
bytes: a binary file) stops it with the file and line named.
"""

import argparse
import gzip
import logging
import os
from pathlib import Path
from typing import Iterator

from espnet_plugin.cli import UserError, run
from espnet_plugin.recipe.kaldi_data import read_table


def sentences(path: Path) -> Iterator[str]:
    """The non-empty lines of a text corpus (gzipped if its name ends in .gz), spaces collapsed."""
    if not path.is_file():
        raise UserError(f"--text {path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    count = 0
    try:
        with opener(path, "rt", encoding="utf-8", newline="\n") as f:
            for lineno, line in enumerate(f, 1):
                if "\0" in line:
                    raise UserError(f"{path}:{lineno}: a NUL byte: this is not a text file")
                words = " ".join(line.split())
                if words:
                    count += 1
                    yield words
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err}): is it a text corpus?") from None
    except (OSError, EOFError) as err:  # a .gz that is not gzip, or cut short
        raise UserError(f"{path}: cannot be read ({err})") from None
    if count == 0:
        raise UserError(f"--text {path}: no sentence in it (the file is empty)")


def write_lm_text(transcripts: Path, corpora: list[Path], exclude: list[Path], out: Path) -> dict:
    """Write the LM text; returns how many sentences came from where and how many were left out."""
    left_out = {" ".join(s.split()) for path in exclude for s in read_table(path).values()}
    counts = {"transcripts": 0, "corpora": 0, "excluded": 0}
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "w", encoding="utf-8") as f:
        number = 0
        sources = [("transcripts", read_table(transcripts, value_name="transcript").values())]
        sources += [("corpora", sentences(path)) for path in corpora]
        for kind, lines in sources:
            for sentence in lines:
                sentence = " ".join(sentence.split())
                if sentence in left_out:
                    counts["excluded"] += 1
                    continue
                number += 1
                counts[kind] += 1
                f.write(f"lm{number:09d} {sentence}\n")
    os.replace(partial, out)
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m espnet_plugin.recipe.lm_text",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--transcripts", type=Path, required=True,
                        help="the training set's Kaldi text (not its speed-perturbed copies)")
    parser.add_argument("--text", type=Path, action="append", default=[],
                        help="a text corpus, one sentence per line (.gz allowed); repeatable")
    parser.add_argument("--exclude", type=Path, action="append", default=[],
                        help="Kaldi text whose sentences the LM must not read; repeatable")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    counts = write_lm_text(args.transcripts, args.text, args.exclude, args.out)
    logging.info(f"wrote {args.out}: {counts['transcripts']} transcripts, {counts['corpora']} "
                 f"corpus sentences; left out {counts['excluded']} sentences of the evaluation sets")


if __name__ == "__main__":
    run(main)
