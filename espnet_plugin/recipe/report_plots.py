"""The study report's figures, sized for a paper: 6.5 inches wide at 200 dpi, labelled axes with
units, legends outside the data. Drawn on matplotlib's Agg canvas without pyplot, so no display
and no global state is needed; each function draws the numbers it is given (and the runs of the
``benchmark_encoder`` files, read here as the encoder-time curves' only source).
"""

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Annotation, Text
from matplotlib.ticker import NullLocator
from matplotlib.transforms import Bbox

from espnet_plugin.cli import UserError
from espnet_plugin.recipe.study_layout import is_number, read_json_object

WIDTH_INCHES, DPI = 6.5, 200
MARKERS = ("o", "s", "^", "D", "P", "v", "X", "*")
LINE_STYLES = ("-", "--", ":", "-.")
CACHE_LABEL = "decoder cache per utterance (KB)"


@dataclass(frozen=True)
class Style:
    """One colour per encoder and one marker per attention type, the same in every figure."""

    encoders: tuple[str, ...]  # in the report's order
    attentions: tuple[str, ...]

    def colour(self, encoder: str) -> str:
        return f"C{self.encoders.index(encoder) % 10}"

    def marker(self, attention: str) -> str:
        return MARKERS[self.attentions.index(attention) % len(MARKERS)]


@dataclass(frozen=True)
class Bar:
    label: str
    encoder: str
    value: float
    note: str = ""  # written after the value at the bar's end


@dataclass(frozen=True)
class Point:
    label: str
    encoder: str
    attention: str
    x: float
    y: float


def _figure(height: float) -> Figure:
    figure = Figure(figsize=(WIDTH_INCHES, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _legend(figure: Figure, handles: list, title: str | None = None, below: bool = False) -> None:
    """Legend outside the axes (right, or below the panels), where it cannot cover the data."""
    figure.legend(handles=handles, loc="outside lower center" if below else "outside right upper",
                  ncols=3 if below else 1, fontsize="small", title=title, title_fontsize="small")


def _save(figure: Figure, path: Path, handles: list, title: str | None = None,
          below: bool = False) -> None:
    _legend(figure, handles, title, below)
    figure.savefig(path, dpi=DPI)


def _encoder_handles(style: Style, encoders: set[str]) -> list[Line2D]:
    return [Line2D([], [], color=style.colour(e), marker="s", linestyle="", label=e)
            for e in style.encoders if e in encoders]


def bar_chart(bars: list[Bar], xlabel: str, path: Path, style: Style) -> None:
    """Horizontal bars, first at the top, coloured by encoder, each with its value written."""
    axes = (figure := _figure(max(2.5, 0.9 + 0.28 * len(bars)))).add_subplot()
    rows = range(len(bars))[::-1]
    drawn = axes.barh(rows, [b.value for b in bars], color=[style.colour(b.encoder) for b in bars])
    axes.bar_label(drawn, [f"{b.value:.3g}{b.note}" for b in bars], padding=2, fontsize="x-small")
    axes.set_yticks(rows, [b.label for b in bars], fontsize="x-small")
    axes.set_xlabel(xlabel)
    axes.margins(x=0.2)  # room for the values
    _save(figure, path, _encoder_handles(style, {b.encoder for b in bars}), "encoder")


@dataclass(frozen=True)
class ErrorBar:
    """A model's error rate over its seeds: the mean, and the sd where it has several."""

    label: str
    encoder: str
    mean: float
    sd: float | None
    seeds: int


def wer_over_seeds(panels: dict[str, list[ErrorBar]], path: Path, style: Style) -> Figure:
    """One panel per test set: each model's WER mean over its seeds as a bar, the sd over them as
    an error bar either side (none for one seed), the same models in every panel."""
    labels = list(dict.fromkeys(b.label for bars in panels.values() for b in bars))
    rows = {label: len(labels) - 1 - i for i, label in enumerate(labels)}  # first at the top
    figure = _figure(max(2.5, 0.9 + 0.28 * len(labels)))
    axes_row = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for axes, (test_set, bars) in zip(axes_row, panels.items()):
        axes.barh([rows[b.label] for b in bars], [b.mean for b in bars],
                  color=[style.colour(b.encoder) for b in bars])
        spread = [b for b in bars if b.sd is not None]
        if spread:
            axes.errorbar([b.mean for b in spread], [rows[b.label] for b in spread],
                          xerr=[b.sd for b in spread], fmt="none", ecolor="black",
                          elinewidth=0.8, capsize=2)
        for b in bars:
            spread = "" if b.sd is None else f" ± {b.sd:.2g}"
            axes.annotate(f"{b.mean:.3g}{spread} (n={b.seeds})", (b.mean + (b.sd or 0.0),
                          rows[b.label]), xytext=(2, 0), textcoords="offset points",
                          va="center", fontsize="xx-small")
        axes.set_xlabel(f"WER on {test_set} (%)", fontsize="small")
        axes.tick_params(labelsize="x-small")
        axes.margins(x=0.35)  # room for the values
    axes_row[0].set_yticks(list(rows.values()), list(rows), fontsize="x-small")
    encoders = {b.encoder for bars in panels.values() for b in bars}
    _save(figure, path, _encoder_handles(style, encoders), "encoder")
    return figure


def name_points(axes: Axes, points: list[Point]) -> list[Annotation]:
    """Write each point's model name beside it (one name list where points coincide), then move
    names up, lowest first, until no two overlap (and to the left of their point where they would
    leave the panel); a thin line joins a name to its point. Models of a study crowd together at
    the same cache size, where names written in place would be unreadable. Call it once the figure
    has its legend: the layout must not change afterwards (the names are kept out of it)."""
    names: dict[tuple[float, float], list[str]] = {}
    for p in points:
        names.setdefault((p.x, p.y), []).append(p.label)
    annotations = [
        axes.annotate("\n".join(labels), xy, xytext=(3, 3), textcoords="offset points",
                      fontsize=5, in_layout=False,
                      arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.3, "shrinkA": 0,
                                  "shrinkB": 2})
        for xy, labels in names.items()
    ]
    figure = axes.get_figure()
    figure.draw_without_rendering()  # lays the figure out: where the names land
    renderer = figure.canvas.get_renderer()

    def name_box(annotation: Annotation) -> Bbox:
        return Text.get_window_extent(annotation, renderer)  # the name, not its line

    right_edge = axes.get_window_extent(renderer).x1
    for annotation in annotations:  # names that would leave the panel go left of their point
        if name_box(annotation).x1 > right_edge:
            annotation.set_horizontalalignment("right")
            annotation.xyann = (-annotation.xyann[0], annotation.xyann[1])
    placed: list[Bbox] = []
    for annotation in sorted(annotations, key=lambda a: name_box(a).y0):
        box = name_box(annotation)
        while (tops := [b.y1 for b in placed if b.overlaps(box)]):
            x_points, y_points = annotation.xyann
            raise_points = (max(tops) - box.y0 + 1) * 72 / figure.dpi
            annotation.xyann = (x_points, y_points + raise_points)
            box = name_box(annotation)
        placed.append(box)
    return annotations


def wer_vs_cache(panels: dict[str, list[Point]], path: Path, style: Style) -> None:
    """One panel per test set: WER against cache size, points named by model."""
    columns = min(len(panels), 2)
    rows = math.ceil(len(panels) / columns)
    figure = _figure(1.0 + 3.0 * rows)
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    for axes, (test_set, points) in zip(axes_grid.flat, panels.items()):
        for p in points:
            axes.scatter(p.x, p.y, color=style.colour(p.encoder), marker=style.marker(p.attention))
        axes.margins(0.15)  # room for the names
        axes.set_xlabel(CACHE_LABEL, fontsize="small")
        axes.set_ylabel(f"WER on {test_set} (%)", fontsize="small")
        axes.tick_params(labelsize="x-small")
    for axes in list(axes_grid.flat)[len(panels):]:
        axes.set_visible(False)
    shown = [p for points in panels.values() for p in points]
    attentions = [a for a in style.attentions if a in {p.attention for p in shown}]
    handles = _encoder_handles(style, {p.encoder for p in shown}) + [
        Line2D([], [], color="grey", marker=style.marker(a), linestyle="", label=f"attention {a}")
        for a in attentions
    ]
    _legend(figure, handles, below=True)
    for axes, points in zip(axes_grid.flat, panels.values()):
        name_points(axes, points)
    figure.savefig(path, dpi=DPI)


def read_encoder_benchmark(path: Path) -> list[dict]:
    """The runs of a ``benchmark_encoder`` JSON file, checked for what the curves need."""
    runs = read_json_object(path).get("runs")
    if not isinstance(runs, list) or not runs:
        raise UserError(f"{path}: expected 'runs', a list of benchmark_encoder runs")
    for run in runs:
        rows = run.get("encoders") if isinstance(run, dict) else None
        if not isinstance(rows, list) or not all(
            isinstance(r, dict) and is_number(r.get("seconds")) and isinstance(r.get("pass"), str)
            for r in rows
        ):
            raise UserError(f"{path}: each run needs 'encoders', rows with 'seconds' and 'pass'")
    return runs


def encoder_names(row: dict) -> list[str]:
    """The encoders a benchmark row times: its ``<name>_ms`` keys."""
    return [k.removesuffix("_ms") for k, v in row.items() if k.endswith("_ms") and is_number(v)]


def encoder_time(benchmarks: dict[str, list[dict]], path: Path) -> None:
    """Encoder time against input length, one panel per pass (forward; forward + backward)."""
    passes = list(dict.fromkeys(r["pass"] for runs in benchmarks.values() for run in runs
                                for r in run["encoders"]))
    names = list(dict.fromkeys(n for runs in benchmarks.values() for run in runs
                               for r in run["encoders"] for n in encoder_names(r)))
    figure = _figure(4.0)
    axes_row = figure.subplots(1, len(passes), squeeze=False)[0]
    handles = {}
    for axes, pass_ in zip(axes_row, passes):
        curve = 0
        for source, runs in benchmarks.items():
            for run in runs:
                rows = sorted((r for r in run["encoders"] if r["pass"] == pass_),
                              key=lambda r: r["seconds"])
                threads = run.get("threads", "?")
                setting = f"{run.get('device', '?')}, {threads} thread{'' if threads == 1 else 's'}"
                if len(benchmarks) > 1:
                    setting += f", {source}"
                style = LINE_STYLES[curve % len(LINE_STYLES)]
                curve += 1
                for name in names:
                    points = [(r["seconds"], r[f"{name}_ms"]) for r in rows if f"{name}_ms" in r]
                    if not points:
                        continue
                    colour = f"C{names.index(name) % 10}"
                    axes.plot(*zip(*points), color=colour, linestyle=style, marker="o",
                              markersize=3)
                    label = f"{name} ({setting})"
                    handles[label] = Line2D([], [], color=colour, linestyle=style, label=label)
        axes.set_title(pass_, fontsize="small")
        axes.set_xlabel("input length (s)", fontsize="small")
        axes.set_ylabel("encoder time (ms)", fontsize="small")
        axes.tick_params(labelsize="x-small")
    _save(figure, path, list(handles.values()), below=True)


def throughput_and_memory(models: dict[str, list[dict]], path: Path,
                          budget_mb: float | None = None) -> None:
    """Per model (attention type), against batch size: utterances per second (left) and peak
    decoding memory (right, with the budget if any); rows as ``benchmark_kv_batch`` writes them
    (``batch_size``, ``utterances_per_second``, ``peak_bytes``)."""
    figure = _figure(3.2)
    speed, memory = figure.subplots(1, 2)
    handles = []
    for index, (name, rows) in enumerate(models.items()):
        rows = sorted(rows, key=lambda r: r["batch_size"])
        batches = [r["batch_size"] for r in rows]
        colour, marker = f"C{index % 10}", MARKERS[index % len(MARKERS)]
        speed.plot(batches, [r["utterances_per_second"] for r in rows], color=colour,
                   marker=marker, markersize=3)
        memory.plot(batches, [r["peak_bytes"] / 2**20 for r in rows], color=colour,
                    marker=marker, markersize=3)
        handles.append(Line2D([], [], color=colour, marker=marker, label=name))
    if budget_mb is not None:
        memory.axhline(budget_mb, color="grey", linestyle="--", linewidth=0.8)
        handles.append(Line2D([], [], color="grey", linestyle="--", label="memory budget"))
    sizes = sorted({r["batch_size"] for rows in models.values() for r in rows})
    for axes, label in ((speed, "utterances per second"), (memory, "peak decoding memory (MB)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(sizes, [str(size) for size in sizes])  # batch sizes as they are
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_yscale("log")
        axes.set_xlabel("batch size (utterances)", fontsize="small")
        axes.set_ylabel(label, fontsize="small")
        axes.tick_params(labelsize="x-small")
    _save(figure, path, handles, below=True)
