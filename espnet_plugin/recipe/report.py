"""Compare every scored decode under an exp dir: ``python -m espnet_plugin.recipe.report``.

Writes into ``--out_dir``: ``RESULTS.md`` (one row per model, decode and test set), ``results.json``
(the same rows at full precision, with each unit's result.json under ``scores``) and PNG plots.

Layout, the one ``asr.sh`` writes, read without any options:

    <exp_dir>/<model>/<decode_dir>/<test_set>/score_<unit>/result.json

A score folder's parent is the test set, the one above it the decode dir, and the path from
``exp_dir`` down to the decode dir is the model, however many folders deep (``exp/ablation/asr_x``).

Sidecars: ``decode_stats.json`` and ``benchmark*.json`` files in the test-set folder, the decode dir
or any folder of the model path add their top-level numbers and strings as extra columns to every
row below them; on a shared key the file nearest the test set wins, and within one folder the later
file name. Nested values are left out. These keys also get a plot:

    rtf                real-time factor, decode seconds per audio second  -> WER vs RTF scatter
    kv_cache_bytes     attention key/value cache size                      -> bar chart
    peak_memory_bytes  peak accelerator memory while decoding              -> bar chart
"""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from espnet_plugin.cli import UserError, run
from espnet_plugin.recipe.score import UNITS

RESULT_FILE = "result.json"
SCORE_DIR_PREFIX = "score_"
SIDECAR_PATTERNS = ("decode_stats.json", "benchmark*.json")
RTF, KV_CACHE_BYTES, PEAK_MEMORY_BYTES = "rtf", "kv_cache_bytes", "peak_memory_bytes"
PLOTTED_EXTRAS = (RTF, KV_CACHE_BYTES, PEAK_MEMORY_BYTES)
# Fixed columns: name -> (unit whose result.json provides it, key in that result.json).
SCORE_COLUMNS = {
    "WER": ("word", "error_rate"),
    "CER": ("char", "error_rate"),
    "Sub": ("word", "sub_rate"),
    "Del": ("word", "del_rate"),
    "Ins": ("word", "ins_rate"),
}
KEY_COLUMNS = ("model", "decode", "test_set")
_REQUIRED_RESULT_KEYS = tuple(dict.fromkeys(["unit", *(key for _, key in SCORE_COLUMNS.values())]))
_MiB = 2**20


@dataclass
class Row:
    """One model decoded one test set with one decode config: its scores and sidecar extras."""

    model: str
    decode: str
    test_set: str
    scores: dict[str, dict] = field(default_factory=dict)  # unit -> result.json
    extras: dict[str, int | float | str] = field(default_factory=dict)

    @property
    def system(self) -> str:
        return f"{self.model}/{self.decode}"

    def value(self, column: str) -> int | float | str | None:
        """The row's cell in ``column``; None where it has no such score or extra."""
        if column in KEY_COLUMNS:
            return getattr(self, column)
        if column in SCORE_COLUMNS:
            unit, key = SCORE_COLUMNS[column]
            return self.scores[unit][key] if unit in self.scores else None
        return self.extras.get(column)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_result(path: Path) -> dict:
    result = read_json_object(path)
    missing = [key for key in _REQUIRED_RESULT_KEYS if key not in result]
    if missing:
        raise UserError(
            f"{path}: lacks {', '.join(missing)}; write it with espnet_plugin.recipe.score"
        )
    if result["unit"] not in UNITS:
        raise UserError(f"{path}: unit must be one of {', '.join(UNITS)}, got {result['unit']!r}")
    return result


def folder_extras(folder: Path) -> dict[str, int | float | str]:
    """Top-level scalar values of the sidecar JSON files directly in ``folder``."""
    files = sorted({p for pattern in SIDECAR_PATTERNS for p in folder.glob(pattern)})
    extras = {}
    for path in files:
        for key, value in read_json_object(path).items():
            if key in PLOTTED_EXTRAS and not _is_number(value):
                raise UserError(f"{path}: '{key}' must be a number, got {value!r}")
            if isinstance(value, (int, float, str)):
                if key in SCORE_COLUMNS or key in KEY_COLUMNS:
                    raise UserError(f"{path}: key '{key}' would hide the report's own column")
                extras[key] = value
    return extras


def collect_rows(exp_dir: Path) -> list[Row]:
    """Every ``score_*/result.json`` under ``exp_dir`` grouped into rows, with their sidecars."""
    rows: dict[tuple[str, str, str], Row] = {}
    sources: dict[tuple[str, str, str, str], Path] = {}
    for path in sorted(exp_dir.rglob(f"{SCORE_DIR_PREFIX}*/{RESULT_FILE}")):
        parts = path.relative_to(exp_dir).parts
        if len(parts) < 5:
            raise UserError(
                f"{path} is too shallow for the layout "
                f"<exp_dir>/<model>/<decode_dir>/<test_set>/{SCORE_DIR_PREFIX}<unit>/{RESULT_FILE}"
            )
        *model, decode, test_set = parts[:-2]
        key = ("/".join(model), decode, test_set)
        result = read_result(path)
        other = sources.setdefault((*key, result["unit"]), path)
        if other != path:
            raise UserError(f"{other} and {path} both score unit '{result['unit']}' of {key}")
        if key not in rows:
            extras = {}
            for depth in range(1, len(parts) - 1):  # top model folder down to the test set
                extras.update(folder_extras(exp_dir.joinpath(*parts[:depth])))
            rows[key] = Row(*key, extras=extras)
        rows[key].scores[result["unit"]] = result
    return sorted(rows.values(), key=lambda row: (row.model, row.decode, row.test_set))


def table_columns(rows: list[Row]) -> list[str]:
    """Key columns, the score columns some row has, then plotted extras first, others by name."""
    extras = {key for row in rows for key in row.extras}
    return [
        *KEY_COLUMNS,
        *(c for c in SCORE_COLUMNS if any(row.value(c) is not None for row in rows)),
        *(c for c in PLOTTED_EXTRAS if c in extras),
        *sorted(extras - set(PLOTTED_EXTRAS)),
    ]


def format_cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column in SCORE_COLUMNS:
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[Row], columns: list[str]) -> str:
    lines = ["|" + "|".join(columns) + "|", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = (format_cell(column, row.value(column)) for column in columns)
        lines.append("|" + "|".join(cells) + "|")
    return "\n".join(lines)


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
    """A figure drawn by the Agg canvas: no pyplot state, no display needed."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> None:
    """Legend under the axes, where long model names cannot cover the data."""
    figure.legend(loc="outside lower center", fontsize="small")
    figure.savefig(path, dpi=100)


def bar_chart(rows: list[Row], column: str, ylabel: str, path: Path, scale: float = 1.0) -> None:
    """Bars of ``column`` grouped by test set, one colour per model/decode."""
    values = {(r.system, r.test_set): r.value(column) for r in rows if r.value(column) is not None}
    test_sets = sorted({test_set for _, test_set in values})
    systems = sorted({system for system, _ in values})
    width = 0.8 / len(systems)
    axes = (figure := _figure()).add_subplot()
    for i, system in enumerate(systems):
        bars = axes.bar(
            [x - 0.4 + (i + 0.5) * width for x in range(len(test_sets))],
            [values.get((system, t), float("nan")) / scale for t in test_sets],
            width,
            label=system,
        )
        axes.bar_label(bars, fmt="%.3g", fontsize="x-small")
    axes.set_xticks(range(len(test_sets)), test_sets)
    axes.set_ylabel(ylabel)
    _save(figure, path)


def wer_rtf_scatter(rows: list[Row], path: Path) -> None:
    """WER against real-time factor, one colour per model/decode, points named by test set."""
    axes = (figure := _figure()).add_subplot()
    for system in sorted({row.system for row in rows}):
        points = [
            (r.value(RTF), r.value("WER"), r.test_set)
            for r in rows
            if r.system == system and r.value(RTF) is not None and r.value("WER") is not None
        ]
        if points:
            rtf, wer, _ = zip(*points)
            axes.scatter(rtf, wer, label=system)
            for x, y, test_set in points:
                axes.annotate(test_set, (x, y), fontsize="x-small")
    axes.margins(0.15)  # room for the test-set names
    axes.set_xlabel("real-time factor (lower is faster)")
    axes.set_ylabel("WER (%)")
    _save(figure, path)


def write_plots(rows: list[Row], columns: list[str], out_dir: Path) -> list[Path]:
    """The plots the data allows: WER/CER bars always, speed and memory ones when measured."""
    bars = {
        "WER": ("WER (%)", 1.0),
        "CER": ("CER (%)", 1.0),
        KV_CACHE_BYTES: ("KV cache (MiB)", _MiB),
        PEAK_MEMORY_BYTES: ("peak memory (MiB)", _MiB),
    }
    written = []
    for column, (ylabel, scale) in bars.items():
        if column in columns:
            written.append(out_dir / f"{column.lower()}.png")
            bar_chart(rows, column, ylabel, written[-1], scale)
    if RTF in columns and "WER" in columns:
        written.append(out_dir / "wer_vs_rtf.png")
        wer_rtf_scatter(rows, written[-1])
    return written


def write_report(rows: list[Row], out_dir: str | Path, exp_dir: str | Path) -> list[Path]:
    """RESULTS.md, results.json and the plots; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = table_columns(rows)
    plots = write_plots(rows, columns, out_dir)
    records = [{**{c: row.value(c) for c in columns}, "scores": row.scores} for row in rows]
    (out_dir / "results.json").write_text(
        json.dumps({"columns": columns, "rows": records}, indent=2) + "\n", encoding="utf-8"
    )
    notes = (
        f"Scores under `{exp_dir}`. WER, CER, Sub, Del, Ins in %; Sub/Del/Ins are of the word "
        "score; other columns come from sidecar JSON files next to the decodes."
    )
    figures = [f"![{path.stem}]({path.name})" for path in plots]
    (out_dir / "RESULTS.md").write_text(
        "\n\n".join(["# Results", notes, markdown_table(rows, columns), *figures]) + "\n",
        encoding="utf-8",
    )
    return [out_dir / "RESULTS.md", out_dir / "results.json", *plots]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m espnet_plugin.recipe.report",
        description="RESULTS.md, results.json and plots over every scored decode under an exp dir.",
    )
    parser.add_argument("--exp_dir", default="exp", help="the recipe's exp folder")
    parser.add_argument("--out_dir", help="where the report goes (default: <exp_dir>/report)")
    args = parser.parse_args(argv)
    exp_dir = Path(args.exp_dir)
    if not exp_dir.is_dir():
        raise UserError(f"--exp_dir {exp_dir} is not a folder")
    rows = collect_rows(exp_dir)
    if not rows:
        raise UserError(
            f"no scores under {exp_dir}: expected "
            f"<model>/<decode_dir>/<test_set>/{SCORE_DIR_PREFIX}<unit>/{RESULT_FILE}; "
            "run the scoring stage (asr.sh stage 9) first"
        )
    for path in write_report(rows, args.out_dir or exp_dir / "report", exp_dir):
        print(path)


if __name__ == "__main__":
    run(main)
