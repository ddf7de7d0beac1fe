"""Stage 3: train a sentencepiece model on the training text and write ESPnet's token list.

sentencepiece does the modelling and ESPnet's own ``tokenize_text`` writes the vocabulary, so the
token list has exactly the layout ESPnet's trainer and decoder expect (<blank> first, <sos/eos> last).
"""

import argparse
import subprocess
import sys
from pathlib import Path

import sentencepiece

from espnet_plugin.cli import UserError, run
from espnet_plugin.recipe.kaldi_data import read_table

SPECIAL_SYMBOLS = ("<blank>:0", "<unk>:1", "<sos/eos>:-1")


def transcripts(text_file: Path) -> list[str]:
    """The transcripts of a Kaldi ``text`` file (the utterance ids dropped)."""
    lines = list(read_table(text_file, value_name="transcript").values())
    if not lines:
        raise UserError(f"{text_file}: no transcripts to train the tokenizer on")
    return lines


def train_bpe(lines: list[str], out_dir: Path, nbpe: int, bpemode: str, char_cover: float) -> Path:
    """Train ``out_dir/bpe.model`` and return its path."""
    plain_text = out_dir / "train.txt"
    plain_text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        sentencepiece.SentencePieceTrainer.train(
            input=str(plain_text),
            model_prefix=str(out_dir / "bpe"),
            vocab_size=nbpe,
            model_type=bpemode,
            character_coverage=char_cover,
            input_sentence_size=100_000_000,
            shuffle_input_sentence=True,
            minloglevel=1,  # warnings only: its per-iteration log drowns the recipe log
        )
    except RuntimeError as err:
        raise UserError(
            f"sentencepiece could not train a {bpemode} model of --nbpe {nbpe} on {len(lines)} "
            f"transcripts ({err}); a smaller --nbpe fits a small corpus"
        ) from err
    return out_dir / "bpe.model"


def write_token_list(text_file: Path, token_type: str, bpemodel: Path | None, out: Path) -> None:
    """ESPnet's tokenize_text in vocabulary mode, with ESPnet's special symbols."""
    cmd = [sys.executable, "-m", "espnet2.bin.tokenize_text", "--token_type", token_type,
           "--input", str(text_file), "--output", str(out), "--field", "2-",
           "--cleaner", "none", "--write_vocabulary", "true"]
    if bpemodel is not None:
        cmd += ["--bpemodel", str(bpemodel)]
    for symbol in SPECIAL_SYMBOLS:
        cmd += ["--add_symbol", symbol]
    subprocess.run(cmd, check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--text", type=Path, required=True, help="Kaldi text file of the training set")
    parser.add_argument("--out_dir", type=Path, required=True)
    parser.add_argument("--token_type", choices=("bpe", "char"), default="bpe")
    parser.add_argument("--nbpe", type=int, default=300)
    parser.add_argument("--bpemode", choices=("unigram", "bpe"), default="unigram")
    parser.add_argument("--char_cover", type=float, default=1.0)
    args = parser.parse_args(argv)

    lines = transcripts(args.text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    bpemodel = None
    if args.token_type == "bpe":
        bpemodel = train_bpe(lines, args.out_dir, args.nbpe, args.bpemode, args.char_cover)
    write_token_list(args.text, args.token_type, bpemodel, args.out_dir / "tokens.txt")


if __name__ == "__main__":
    run(main)
