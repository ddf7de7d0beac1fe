"""Score ASR hypotheses against references: ``python -m espnet_plugin.recipe.score``.

Reads two Kaldi-style text files (``utt_id transcript...``; a hypothesis may be empty) and writes
into ``--out_dir``:

- ``result.json``: unit, counts and rates; the report step and comparison tools read it.
- ``utterances.json``: each utterance's errors and reference length, ``{utt_id: {"errors": int,
  "ref_len": int}}``: what a paired bootstrap of two systems needs (``recipe.compare``).
- ``result.txt``: an ESPnet RESULTS-style table (Snt Wrd Corr Sub Del Ins Err S.Err); its last
  line is the table row, so ``tail -n 1`` gives the summary.
- ``alignments.txt``: per utterance, sclite-pralign-style REF/HYP/Eval lines and its counts.

Conventions, and how they relate to sclite, which ESPnet's own scoring stage runs:

- The alignment is jiwer's minimum edit distance with unit costs. sclite weighs a substitution 4
  and an insertion or deletion 3, so where two alignments are equally short it picks D+I over two
  S, and occasionally it takes one more error to avoid substitutions. The error count here is
  therefore never above sclite's and equals it on ordinary decodes (tests/test_score.py checks).
- ``--unit char`` follows ESPnet's CER: the characters of the transcript with each space between
  words a token of its own (ESPnet's ``<space>``, shown so in the alignments), so a split or merged
  word costs one error. Runs of whitespace count as one space, as Kaldi text has single spaces.
- Tokens compare case-sensitively (sclite ignores case unless given ``-s``); normalise case when
  preparing the data if the model should not be charged for it.
"""

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jiwer

from espnet_plugin.cli import UserError, run
from espnet_plugin.recipe.kaldi_data import read_text

UNITS = ("word", "char")
METRIC = {"word": "WER", "char": "CER"}
SPACE_TOKEN = "<space>"  # ESPnet's name for the space between words in character units
GAP = "***"  # sclite's mark for the missing side of an insertion or deletion
CORRECT, SUBSTITUTION, DELETION, INSERTION = "C", "S", "D", "I"
RESULT_FILE, UTTERANCES_FILE = "result.json", "utterances.json"
# result.json keys that readers rely on.
SUMMARY_KEYS = ("name", "unit", "metric", "error_rate", "num_utts", "ref_len", "errors")

# jiwer's chunk type -> our per-token operation.
_OPERATION = {"equal": CORRECT, "substitute": SUBSTITUTION, "delete": DELETION, "insert": INSERTION}
_PROCESS = {"word": jiwer.process_words, "char": jiwer.process_characters}


@dataclass(frozen=True)
class AlignedUtterance:
    """One utterance aligned token by token; ``None`` marks the gap opposite an I or a D."""

    utt_id: str
    ref: tuple[str | None, ...]
    hyp: tuple[str | None, ...]
    ops: tuple[str, ...]  # one of C S D I per column

    def count(self, op: str) -> int:
        return self.ops.count(op)

    @property
    def ref_len(self) -> int:
        return sum(token is not None for token in self.ref)

    @property
    def errors(self) -> int:
        return len(self.ops) - self.count(CORRECT)


class UtteranceCounts(NamedTuple):
    """One utterance's score: all that resampling utterances needs."""

    errors: int
    ref_len: int


def percent(count: int, total: int) -> float:
    return 100.0 * count / total


@dataclass(frozen=True)
class ScoreResult:
    """Corpus-level counts of one scoring run plus every utterance's alignment."""

    unit: str
    utterances: tuple[AlignedUtterance, ...]

    def total(self, op: str) -> int:
        return sum(utt.count(op) for utt in self.utterances)

    @property
    def num_utts(self) -> int:
        return len(self.utterances)

    @property
    def ref_len(self) -> int:
        return sum(utt.ref_len for utt in self.utterances)

    @property
    def errors(self) -> int:
        return sum(utt.errors for utt in self.utterances)

    @property
    def sentence_errors(self) -> int:
        return sum(utt.errors > 0 for utt in self.utterances)

    @property
    def error_rate(self) -> float:
        return percent(self.errors, self.ref_len)

    def summary(self, name: str) -> dict:
        """The machine-readable record written to result.json (rates in %)."""
        return {
            "name": name,
            "unit": self.unit,
            "metric": METRIC[self.unit],
            "error_rate": self.error_rate,
            "num_utts": self.num_utts,
            "ref_len": self.ref_len,
            "hits": self.total(CORRECT),
            "substitutions": self.total(SUBSTITUTION),
            "deletions": self.total(DELETION),
            "insertions": self.total(INSERTION),
            "errors": self.errors,
            "corr_rate": percent(self.total(CORRECT), self.ref_len),
            "sub_rate": percent(self.total(SUBSTITUTION), self.ref_len),
            "del_rate": percent(self.total(DELETION), self.ref_len),
            "ins_rate": percent(self.total(INSERTION), self.ref_len),
            "sentence_errors": self.sentence_errors,
            "sentence_error_rate": percent(self.sentence_errors, self.num_utts),
        }

    def utterance_counts(self) -> dict[str, UtteranceCounts]:
        return {u.utt_id: UtteranceCounts(u.errors, u.ref_len) for u in self.utterances}


def _preview(ids: list[str], shown: int = 10) -> str:
    more = f" ... and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def _check_same_utterances(
    ref: Mapping[str, str], hyp: Mapping[str, str], ref_label: str, hyp_label: str
) -> None:
    if not ref:
        raise UserError(f"{ref_label} has no utterances; nothing to score")
    missing = [utt_id for utt_id in ref if utt_id not in hyp]
    if missing:
        raise UserError(
            f"{hyp_label} lacks {len(missing)} of the {len(ref)} utterances of {ref_label} "
            f"(did decoding fail for some?): {_preview(missing)}"
        )
    unknown = [utt_id for utt_id in hyp if utt_id not in ref]
    if unknown:
        raise UserError(
            f"{hyp_label} has {len(unknown)} utterances that {ref_label} does not "
            f"(decoded a different set?): {_preview(unknown)}"
        )


def _aligned(utt_id: str, ref: list[str], hyp: list[str], chunks) -> AlignedUtterance:
    """Expand jiwer's alignment chunks into one column per token."""
    ref_col, hyp_col, ops = [], [], []
    for chunk in chunks:
        op = _OPERATION[chunk.type]
        ref_part = ref[chunk.ref_start_idx : chunk.ref_end_idx]
        hyp_part = hyp[chunk.hyp_start_idx : chunk.hyp_end_idx]
        width = max(len(ref_part), len(hyp_part))
        ref_col += ref_part or [None] * width
        hyp_col += hyp_part or [None] * width
        ops += [op] * width
    return AlignedUtterance(utt_id, tuple(ref_col), tuple(hyp_col), tuple(ops))


def _single_spaced(text: str) -> str:
    return " ".join(text.split())


def _display_tokens(tokens: list[str], unit: str) -> list[str]:
    return [SPACE_TOKEN if unit == "char" and t == " " else t for t in tokens]


def score(
    ref: Mapping[str, str],
    hyp: Mapping[str, str],
    unit: str = "word",
    *,
    ref_label: str = "the reference",
    hyp_label: str = "the hypothesis",
) -> ScoreResult:
    """Align every reference utterance with its hypothesis (labels name the sources in errors)."""
    if unit not in UNITS:
        raise UserError(f"unit must be one of {', '.join(UNITS)}, got '{unit}'")
    _check_same_utterances(ref, hyp, ref_label, hyp_label)
    utt_ids = list(ref)
    output = _PROCESS[unit](
        [_single_spaced(ref[u]) for u in utt_ids], [_single_spaced(hyp[u]) for u in utt_ids]
    )
    result = ScoreResult(
        unit,
        tuple(
            _aligned(utt_id, _display_tokens(r, unit), _display_tokens(h, unit), chunks)
            for utt_id, r, h, chunks in zip(
                utt_ids, output.references, output.hypotheses, output.alignments
            )
        ),
    )
    if result.ref_len == 0:
        raise UserError(
            f"{ref_label}: all {result.num_utts} transcripts are empty, so the "
            f"{METRIC[unit]} is undefined"
        )
    return result


def format_table(summary: dict) -> str:
    """ESPnet RESULTS.md-style table of a ``ScoreResult.summary``; the row is the last line."""
    header = ["dataset", "Snt", "Wrd", "Corr", "Sub", "Del", "Ins", "Err", "S.Err"]
    rates = ("corr_rate", "sub_rate", "del_rate", "ins_rate", "error_rate", "sentence_error_rate")
    row = [summary["name"], str(summary["num_utts"]), str(summary["ref_len"])]
    row += [f"{summary[key]:.1f}" for key in rates]
    unit_note = f" (each space between words is a '{SPACE_TOKEN}' token)"
    return "\n".join(
        [
            f"### {summary['metric']}: {summary['unit']} unit"
            + (unit_note if summary["unit"] == "char" else ""),
            "",
            "|" + "|".join(header) + "|",
            "|" + "|".join("---" for _ in header) + "|",
            "|" + "|".join(row) + "|",
        ]
    )


def format_alignment(utt: AlignedUtterance) -> str:
    """sclite-pralign-style block: id, counts, and REF/HYP/Eval lines padded into columns."""
    cells = [
        (r if r is not None else GAP, h if h is not None else GAP, "" if op == CORRECT else op)
        for r, h, op in zip(utt.ref, utt.hyp, utt.ops)
    ]
    widths = [max(len(r), len(h)) for r, h, _ in cells]

    def line(label: str, column: int) -> str:
        return (label + " ".join(c[column].ljust(w) for c, w in zip(cells, widths))).rstrip()

    counts = " ".join(str(utt.count(op)) for op in (CORRECT, SUBSTITUTION, DELETION, INSERTION))
    return "\n".join(
        [
            f"id: ({utt.utt_id})",
            f"Scores: (#C #S #D #I) {counts}",
            line("REF:  ", 0),
            line("HYP:  ", 1),
            line("Eval: ", 2),
        ]
    )


def write_results(result: ScoreResult, out_dir: str | Path, name: str) -> None:
    """Write result.json, utterances.json, result.txt and alignments.txt into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = result.summary(name)
    (out_dir / RESULT_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    counts = {utt_id: c._asdict() for utt_id, c in result.utterance_counts().items()}
    (out_dir / UTTERANCES_FILE).write_text(json.dumps(counts) + "\n", encoding="utf-8")
    (out_dir / "result.txt").write_text(format_table(summary) + "\n", encoding="utf-8")
    (out_dir / "alignments.txt").write_text(
        "\n\n".join(format_alignment(utt) for utt in result.utterances) + "\n", encoding="utf-8"
    )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def is_count(value) -> bool:
    """A whole number >= 0 (JSON's true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_summary(path: str | Path) -> dict:
    """A ``result.json`` written by :func:`write_results`, checked for the keys readers use."""
    path = Path(path)
    summary = _read_json(path)
    if not isinstance(summary, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if missing:
        raise UserError(
            f"{path}: lacks {', '.join(missing)}; write it with espnet_plugin.recipe.score"
        )
    if summary["unit"] not in UNITS:
        raise UserError(f"{path}: unit must be one of {', '.join(UNITS)}, got {summary['unit']!r}")
    if not isinstance(summary["error_rate"], (int, float)):
        raise UserError(f"{path}: error_rate must be a number, got {summary['error_rate']!r}")
    return summary


def read_utterance_counts(path: str | Path) -> dict[str, UtteranceCounts]:
    """An ``utterances.json`` written by :func:`write_results`: utt_id -> errors, ref_len."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a non-empty JSON object of utterances")
    counts = {}
    for utt_id, entry in data.items():
        if not (isinstance(entry, dict) and is_count(entry.get("errors"))
                and is_count(entry.get("ref_len"))):
            raise UserError(f"{path}: utterance '{utt_id}' needs whole numbers 'errors' and "
                            f"'ref_len', got {entry!r}")
        counts[utt_id] = UtteranceCounts(entry["errors"], entry["ref_len"])
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m espnet_plugin.recipe.score",
        description="WER/CER of Kaldi-style hypothesis text against reference text.",
    )
    parser.add_argument("--ref", required=True, help="reference text: utt_id transcript...")
    parser.add_argument("--hyp", required=True, help="hypothesis text: utt_id transcript...")
    parser.add_argument("--out_dir", required=True, help="where result.json/.txt and alignments go")
    parser.add_argument("--unit", choices=UNITS, default="word", help="word -> WER, char -> CER")
    parser.add_argument("--name", help="test set name in the outputs (default: --hyp's folder)")
    args = parser.parse_args(argv)
    name = args.name or Path(args.hyp).resolve().parent.name
    result = score(
        read_text(args.ref),
        read_text(args.hyp),
        args.unit,
        ref_label=f"reference {args.ref}",
        hyp_label=f"hypothesis {args.hyp}",
    )
    write_results(result, args.out_dir, name)


if __name__ == "__main__":
    run(main)
