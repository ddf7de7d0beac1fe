"""The study's report: ``python -m espnet_plugin.recipe.report --exp_dir exp --out_dir exp/report``.

Reads every scored decode under ``--exp_dir`` (the layout asr.sh writes, see
:mod:`espnet_plugin.recipe.study_layout`) and writes into ``--out_dir``:

- ``RESULTS.md`` and ``RESULTS.txt``: one row per system (model, decode dir), grouped by encoder,
  then attention type, then model name: WER per test set, parameters, decoder cache per utterance
  and its ratio to the MHA sibling (measured, and the analytic one beside it), decode time, RTF,
  peak memory, dynamic chunking's kept share of frames, utterances per second at the largest
  batch stage 10 decoded and the largest batch within the memory budget; then the comparisons the
  study asks for, each a paired bootstrap of the WER difference on the same utterances (pooled
  over seeds where a model has several: their share of its variance beside it); then the figures.
  Models trained with several seeds get a table of WER and CER mean ± sd over them.
- ``results.csv``: the same rows at full precision (missing values are empty cells), with CER.
- ``results.json``: the rows, every test set's scores and profile, and the comparisons.
- PNG figures: ``cache_kb.png``, ``wer_vs_cache.png``, ``decode_time.png``,
  ``batch_throughput.png`` (utterances per second and peak memory against batch size, from
  stage 10's ``profile/kv_batch.json``), ``encoder_time.png`` (from any
  ``benchmark_encoder*.json`` under exp_dir), ``wer_over_seeds.png`` (WER mean and sd over seeds
  per model, when some model has several), each only when there is data for it.

A system whose results no longer match the files they were made from (a stamp lists a file that
has changed or is gone, or a stamp is missing) is marked stale, left out of the comparisons and
named in a warning.
"""

import argparse
import csv
import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from espnet_plugin.cli import UserError, run
from espnet_plugin.recipe import report_plots as plots
from espnet_plugin.recipe.study_layout import (
    ATTENTION_ORDER,
    ENCODER_ORDER,
    LAYOUT,
    NO_ATTENTION,
    Model,
    System,
    TestSet,
    ordered,
    rank,
    read_study,
)
from espnet_plugin.recipe.study_questions import Answer, answer, study_questions

MISSING = "-"
BENCHMARK_PATTERN = "benchmark_encoder*.json"
KB, MB = 1024, 2**20


def system_order(system: System) -> tuple:
    arch = system.model.arch
    return (rank(arch.encoder, ENCODER_ORDER), rank(arch.attention, ATTENTION_ORDER),
            system.model.name, system.decode)


# ---- the numbers of one system ----


def _profiled(system: System, test_sets=None) -> list[TestSet]:
    return [t for name, t in system.test_sets.items()
            if t.profile is not None and (test_sets is None or name in test_sets)]


def _per_utterance(test_sets: list[TestSet], value) -> float | None:
    """``value(profile)`` averaged over the test sets' utterances; None where none has it."""
    weighted = [(t.profile["utterances"], value(t.profile)) for t in test_sets]
    weighted = [(n, v) for n, v in weighted if v is not None]
    if not weighted:
        return None
    return sum(n * v for n, v in weighted) / sum(n for n, _ in weighted)


def _cache(profile: dict, key: str) -> float | None:
    return None if profile["kv_cache"] is None else profile["kv_cache"][key]


def cache_kb(system: System, test_sets=None) -> float | None:
    """Decoder cache of the whole beam per utterance, KB, over the (given) profiled test sets."""
    bytes_ = _per_utterance(_profiled(system, test_sets),
                            lambda p: _cache(p, "beam_bytes_per_utterance"))
    return None if bytes_ is None else bytes_ / KB


def cached_test_sets(system: System) -> set[str]:
    return {t.name for t in _profiled(system) if t.profile["kv_cache"] is not None}


def is_mha_reference(model: Model) -> bool:
    """Trained from scratch with MHA: the encoder's, or the decoder's where the encoder has none."""
    arch = model.arch
    attention = arch.decoder_attention if arch.attention == NO_ATTENTION else arch.attention
    return model.origin == "scratch" and attention == "mha"


def mha_sibling(system: System, systems: list[System]) -> System | None:
    """The current decode, with the same options, of the MHA model of the same encoder and size
    (of the same seed where there is one: a cache's size follows the hypotheses' lengths)."""
    arch = system.model.arch
    candidates = [
        s for s in systems
        if is_mha_reference(s.model) and not s.stale and s.decoding == system.decoding
        and s.model.arch.encoder == arch.encoder and s.model.arch.size == arch.size
    ]
    # Itself where it is one; else the closest: same seed, same chunking (its design, then any
    # router), same frame rate, MHA decoder.
    candidates.sort(key=lambda s: (s is not system, s.model.seed != system.model.seed,
                                   s.model.arch.chunking_design != arch.chunking_design,
                                   s.model.arch.chunking != arch.chunking,
                                   s.model.arch.input_layer != arch.input_layer,
                                   s.model.arch.decoder_attention != "mha", s.model.name))
    return candidates[0] if candidates else None


def measured_ratio(system: System, sibling: System | None) -> float | None:
    """Cache per utterance over the sibling's, on the test sets both profiled with a cache."""
    if sibling is None:
        return None
    shared = cached_test_sets(system) & cached_test_sets(sibling)
    own, theirs = cache_kb(system, shared), cache_kb(sibling, shared)
    return None if own is None or not theirs else own / theirs


def batch_rows(system: System) -> list[dict]:
    """Stage 10's batched decodes over the profiled test sets, per batch size: utterances per
    second (all utterances over all seconds) and the largest peak."""
    sizes: dict[int, list[dict]] = {}
    for test_set in _profiled(system):
        for row in (test_set.profile.get("batches") or {}).get("rows", []):
            sizes.setdefault(row["batch_size"], []).append(row)
    return [{"batch_size": size,
             "utterances_per_second": size * len(rows) / sum(r["seconds"] for r in rows),
             "peak_bytes": max(r["peak_bytes"] for r in rows)}
            for size, rows in sorted(sizes.items())]


def batch_numbers(system: System) -> dict:
    """The largest batch measured, its utterances per second, and the largest batch within the
    memory budget on every profiled test set (the smallest of theirs)."""
    rows = batch_rows(system)
    within = [t.profile["batches"]["largest_batch_within_budget"] for t in _profiled(system)
              if t.profile.get("batches") and t.profile["batches"].get("memory_budget_mb")]
    return {"batch_size": rows[-1]["batch_size"] if rows else None,
            "batch_utterances_per_second": rows[-1]["utterances_per_second"] if rows else None,
            "largest_batch_within_budget": (None if not within or None in within
                                            else min(within))}


def profile_numbers(system: System) -> dict:
    profiled = _profiled(system)
    audio = sum(t.profile["audio_seconds"] for t in profiled)
    decode_ms = sum(t.profile["decode_ms_per_utterance"] * t.profile["utterances"]
                    for t in profiled)
    peaks = [t.profile["peak_memory_bytes"] for t in profiled
             if t.profile["peak_memory_bytes"] is not None]
    chunked = [t.profile["chunking"] for t in profiled if t.profile["chunking"] is not None]
    frames = sum(c["frames"] for c in chunked)
    return {
        "parameters": profiled[0].profile["parameters"] if profiled else None,
        "cache_kb_per_utterance": cache_kb(system),
        "cache_ratio_analytic": _per_utterance(
            profiled, lambda p: _cache(p, "ratio_to_mha_analytic")),
        "decode_ms_per_utterance": _per_utterance(
            profiled, lambda p: p["decode_ms_per_utterance"]),
        "rtf": decode_ms / 1000 / audio if profiled else None,
        "peak_memory_mb": max(peaks) / MB if peaks else None,
        "chunking_ratio": sum(c["kept_frames"] for c in chunked) / frames if frames else None,
        **batch_numbers(system),
    }


# ---- the table ----


@dataclass(frozen=True)
class Column:
    key: str  # in results.csv and results.json
    label: str  # in RESULTS.md and RESULTS.txt
    fmt: str = ""  # format of a number in RESULTS.md/.txt
    scale: float = 1.0  # RESULTS.md/.txt show value / scale
    optional: bool = False  # RESULTS.md/.txt leave it out when no system has a value


def columns(test_sets: list[str], units: set[str]) -> tuple[list[Column], list[Column]]:
    """The table's columns, and the extra ones of results.csv/.json."""
    table = [
        Column("model", "model"),
        Column("decode", "decode"),
        Column("encoder", "encoder"),
        Column("attention", "attention"),
        Column("decoder_attention", "decoder attention"),
        Column("lm", "LM", optional=True),
        Column("lm_weight", "LM weight", ".2g", optional=True),
        *(Column(f"wer_{t}", f"WER {t} (%)", ".2f") for t in test_sets if "word" in units),
        Column("parameters", "params (M)", ".2f", 1e6),
        Column("cache_kb_per_utterance", "cache KB/utt", ".1f"),
        Column("cache_ratio_measured", "cache/MHA measured", ".3f"),
        Column("cache_ratio_analytic", "cache/MHA analytic", ".3f"),
        Column("decode_ms_per_utterance", "ms/utt", ".0f"),
        Column("rtf", "RTF", ".3f"),
        Column("peak_memory_mb", "peak MB", ".0f"),
        Column("chunking_ratio", "kept frames", ".3f", optional=True),
        Column("batch_size", "batch", optional=True),
        Column("batch_utterances_per_second", "utt/s at batch", ".2f", optional=True),
        Column("largest_batch_within_budget", "batch in budget", optional=True),
        Column("stale", "stale"),
    ]
    extra = [*(Column(f"cer_{t}", f"CER {t} (%)", ".2f") for t in test_sets if "char" in units),
             Column("mha_sibling", "MHA sibling")]
    return table, extra


def system_row(system: System, systems: list[System], test_sets: list[str]) -> dict:
    model, sibling = system.model, mha_sibling(system, systems)
    row = {
        "model": model.name,
        "decode": system.decode,
        "encoder": model.arch.encoder,
        "attention": model.attention_label,
        "decoder_attention": model.decoder_attention_label,
        "lm": system.lm,
        "lm_weight": system.lm_weight,
    }
    for unit, prefix in (("word", "wer"), ("char", "cer")):
        for name in test_sets:
            test_set = system.test_sets.get(name)
            score = test_set.scores.get(unit) if test_set else None
            row[f"{prefix}_{name}"] = score["error_rate"] if score else None
    row.update(profile_numbers(system))
    row["cache_ratio_measured"] = measured_ratio(system, sibling)
    row["stale"] = bool(system.stale)
    row["mha_sibling"] = sibling.name if sibling else None
    return row


def cell(column: Column, value) -> str:
    """A value as RESULTS.md/.txt show it: missing as "-", never as 0."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "STALE" if value else ""
    if isinstance(value, (int, float)) and column.fmt:
        return format(value / column.scale, column.fmt)
    return str(value)


def csv_cell(value) -> str | int | float:
    """A value as results.csv holds it: numbers as Python writes them (exact), missing as ""."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def markdown_table(header: list[str], rows: list[list[str]], numeric: list[bool]) -> str:
    """A pipe table, numbers right-aligned; a "|" inside a cell is escaped."""

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def text_table(header: list[str], rows: list[list[str]], numeric: list[bool]) -> str:
    """Columns padded to their widest cell, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        padded = (c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric))
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ---- the report ----


def system_labels(systems: list[System]) -> dict[str, str]:
    """Short names for tables of comparisons and figures: the model (+ its LM), unique."""
    short = {s.name: s.model.name + (f" + {s.lm}" if s.lm else "") for s in systems}
    taken = list(short.values())
    return {name: label if taken.count(label) == 1 else name for name, label in short.items()}


def test_set_record(test_set: TestSet, exp_dir: Path) -> dict:
    profile = test_set.profile and {k: v for k, v in test_set.profile.items()
                                    if k != "per_utterance"}
    return {"path": test_set.path.relative_to(exp_dir).as_posix(), "scores": test_set.scores,
            "profile": profile, "decoding": test_set.decoding, "stale": test_set.stale}


@dataclass
class Report:
    """Everything the outputs show, gathered once."""

    exp_dir: Path
    systems: list[System]  # in the table's order
    rows: list[dict]  # one per system: column key -> value
    table: list[Column]
    extra: list[Column]  # results.csv/.json only
    labels: dict[str, str]  # system name -> short name
    answers: list[Answer]
    benchmarks: dict[str, list[dict]]  # benchmark_encoder file under exp_dir -> its runs
    samples: int

    @property
    def about(self) -> str:
        return (f"{len(self.systems)} systems under {self.exp_dir}. Comparisons: paired bootstrap "
                f"over utterances ({self.samples} resamples) of the WER difference B - A in "
                "points, with its 95% interval; A is the reference of each question. Pooled over "
                "seeds, the seeds are resampled too; seed share: the part of the difference's "
                "variance that the seeds' spread makes.")

    def shown_columns(self) -> list[Column]:
        return [c for c in self.table
                if not c.optional or any(r[c.key] is not None for r in self.rows)]


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """The figures the data allows."""
    systems, rows, labels = report.systems, report.rows, report.labels
    test_sets = test_set_names(systems)
    style = plots.Style(ordered((s.model.arch.encoder for s in systems), ENCODER_ORDER),
                        ordered((s.model.arch.attention for s in systems), ATTENTION_ORDER))
    shown = [(s, r, labels[s.name] + (" (stale)" if r["stale"] else ""))
             for s, r in zip(systems, rows)]
    written = []
    cache = [plots.Bar(label, s.model.arch.encoder, r["cache_kb_per_utterance"])
             for s, r, label in shown if r["cache_kb_per_utterance"] is not None]
    if cache:
        written.append(out_dir / "cache_kb.png")
        plots.bar_chart(cache, plots.CACHE_LABEL, written[-1], style)
    panels = {}
    for name in test_sets:
        points = [
            plots.Point(label, s.model.arch.encoder, s.model.arch.attention,
                        cache_kb(s, {name}), r[f"wer_{name}"])
            for s, r, label in shown
            if r.get(f"wer_{name}") is not None and cache_kb(s, {name}) is not None
        ]
        if points:
            panels[name] = points
    if panels:
        written.append(out_dir / "wer_vs_cache.png")
        plots.wer_vs_cache(panels, written[-1], style)
    times = [plots.Bar(label, s.model.arch.encoder, r["decode_ms_per_utterance"],
                       f", RTF {r['rtf']:.3g}")
             for s, r, label in shown if r["decode_ms_per_utterance"] is not None]
    if times:
        written.append(out_dir / "decode_time.png")
        plots.bar_chart(times, "decode time per utterance (ms)", written[-1], style)
    groups = seed_groups(report)
    if any(len(g.rows) > 1 for g in groups):
        bars = {name: [plots.ErrorBar(g.model, g.encoder, *spread, len(g.rows))
                       for g in groups if (spread := mean_sd(g, f"wer_{name}")) is not None]
                for name in test_sets}
        written.append(out_dir / "wer_over_seeds.png")
        plots.wer_over_seeds({name: b for name, b in bars.items() if b}, written[-1], style)
    batches = {label: batch_rows(s) for s, r, label in shown if r["batch_size"] is not None}
    if batches:
        budgets = {t.profile["batches"].get("memory_budget_mb") for s in systems
                   for t in _profiled(s) if t.profile.get("batches")} - {None}
        written.append(out_dir / "batch_throughput.png")
        plots.throughput_and_memory(batches, written[-1],
                                    next(iter(budgets)) if len(budgets) == 1 else None)
    if report.benchmarks:
        written.append(out_dir / "encoder_time.png")
        plots.encoder_time(report.benchmarks, written[-1])
    return written


def notes(report: Report) -> list[str]:
    """What the table's numbers are, and which rows are stale and why."""
    systems, rows, labels = report.systems, report.rows, report.labels
    lines = [
        "Error rates in %, per test set. \"-\": not measured. Profiled numbers (parameters, "
        "cache, time, memory, kept frames) come from each test set's profile/decode_stats.json, "
        "averaged over the profiled test sets' utterances; RTF is their decode seconds over "
        "their audio seconds.",
        "cache KB/utt: the decoder's key/value cache for the whole beam at the last decoding "
        "step, KB = 1024 bytes; \"-\" where the decoder keeps no key/value cache (ESPnet's stock "
        "transformer decoder) or nothing was profiled. cache/MHA measured: over the cache of "
        "the MHA sibling (same encoder and size, MHA, trained from scratch, decoded with the "
        "same options) on the test sets both profiled; analytic: the profile's ratio to an MHA "
        "decoder of the same shape.",
    ]
    if any(r["batch_size"] is not None for r in rows):
        lines.append(
            "batch: the largest batch stage 10 decoded (the test set's longest utterances, "
            "asr.sh --profile_batch_sizes, the plugin's batched beam search, no LM); utt/s at "
            "batch: its utterances per second; batch in budget: the largest batch whose peak "
            "decoding memory (the search's state on a CPU, torch.cuda.max_memory_allocated on a "
            "GPU) is within asr.sh --memory_budget_mb, the smallest over the test sets.")
    siblings = sorted({(labels[s.name], labels[r["mha_sibling"]]) for s, r in zip(systems, rows)
                       if r["mha_sibling"] and r["mha_sibling"] != s.name})
    if siblings:
        lines.append("MHA siblings: " + "; ".join(f"{a} -> {b}" for a, b in siblings) + ".")
    kinds: dict[str, list[str]] = {}
    for system in systems:
        for test_set in _profiled(system):
            if test_set.profile["peak_memory_bytes"] is not None:
                kind = kinds.setdefault(test_set.profile["peak_memory_kind"], [])
                if labels[system.name] not in kind:
                    kind.append(labels[system.name])
    if len(kinds) == 1:
        lines.append(f"peak MB (MB = 2^20 bytes): {next(iter(kinds))}.")
    elif kinds:
        lines.append("peak MB (MB = 2^20 bytes): " + "; ".join(
            f"{kind} ({', '.join(names)})" for kind, names in kinds.items()) + ".")
    for system in (s for s in systems if s.stale):
        lines.append(f"STALE {system.name}: {'; '.join(system.stale)}. Not compared; run asr.sh "
                     "again to bring it up to date.")
    return lines


def comparison_table(report: Report) -> tuple[list, list, list]:
    """Header, rows and which columns are numbers: one row per comparison."""
    labels = report.labels
    header = ["question", "A", "B", "test set", "WER A", "WER B", "B - A", "95% interval",
              "excludes 0", "seed share"]
    numeric = [False, False, False, False, True, True, True, False, False, True]
    rows = [
        [c["question"], labels.get(c["a"], c["a"]), labels.get(c["b"], c["b"]), c["test_set"],
         f"{c['error_rate_a']:.2f}", f"{c['error_rate_b']:.2f}", f"{c['difference']:+.2f}",
         f"[{c['interval_95'][0]:+.2f}, {c['interval_95'][1]:+.2f}]",
         "yes" if c["excludes_zero"] else "no",
         f"{c['seed_share']:.2f}" if "seed_share" in c else MISSING]
        for a in report.answers for c in a.comparisons
    ]
    return header, rows, numeric


def left_out_lines(answers: list[Answer]) -> list[str]:
    """One line per reason: the questions left unanswered for it."""
    by_reason: dict[str, list[str]] = {}
    for a in answers:
        if a.left_out:
            by_reason.setdefault(a.left_out, []).append(a.question)
    return [f"Not compared ({reason}): {'; '.join(questions)}."
            for reason, questions in by_reason.items()]


def gather(exp_dir: Path, out_dir: Path, samples: int) -> Report:
    skip = [out_dir, exp_dir / "report"]
    systems = sorted(read_study(exp_dir, skip), key=system_order)
    if not systems:
        raise UserError(f"no scored decode under {exp_dir}: expected {LAYOUT}; run asr.sh's "
                        "decoding and scoring stages first")
    for system in (s for s in systems if s.stale):
        logging.warning(f"{system.name} is stale, marked so and not compared: "
                        f"{'; '.join(system.stale)}")
    test_sets = test_set_names(systems)
    units = {unit for s in systems for t in s.test_sets.values() for unit in t.scores}
    models = list({id(s.model): s.model for s in systems}.values())
    benchmarks = {
        path.relative_to(exp_dir).as_posix(): plots.read_encoder_benchmark(path)
        for path in sorted(exp_dir.rglob(BENCHMARK_PATTERN))
        if not any(path.resolve().is_relative_to(folder.resolve()) for folder in skip)
    }
    return Report(
        exp_dir, systems, [system_row(s, systems, test_sets) for s in systems],
        *columns(test_sets, units), system_labels(systems),
        [answer(q, systems, samples) for q in study_questions(models)], benchmarks, samples,
    )


@dataclass(frozen=True)
class SeedGroup:
    """The current rows of one model's seeds decoded with one decode's name."""

    model: str  # the model the seeds share (``Model.group``)
    decode: str
    encoder: str
    rows: list[dict]


def seed_groups(report: Report) -> list[SeedGroup]:
    """Every model and decode, its current (not stale) rows over the seeds, in the table's order."""
    groups: dict[tuple[str, str], SeedGroup] = {}
    for system, row in zip(report.systems, report.rows):
        if not row["stale"]:
            key = (system.model.group, system.decode)
            groups.setdefault(key, SeedGroup(*key, system.model.arch.encoder, [])).rows.append(row)
    return list(groups.values())


def mean_sd(group: SeedGroup, key: str) -> tuple[float, float | None] | None:
    """Mean and sd (ddof 1; None for one value) of a column over a group's seeds, None if unmeasured."""
    values = [r[key] for r in group.rows if r.get(key) is not None]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def over_seeds(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per model trained with several seeds and decode, the seeds, and WER then
    CER mean ± sd per test set; no rows where no model has more than one seed."""
    keys = [Column(f"{prefix}_{t}", f"{prefix.upper()} {t} (%) mean ± sd")
            for prefix in ("wer", "cer") for t in test_set_names(report.systems)
            if any(r.get(f"{prefix}_{t}") is not None for r in report.rows)]
    rows = []
    for group in (g for g in seed_groups(report) if len(g.rows) > 1):
        cells = [group.model, group.decode, str(len(group.rows))]
        for column in keys:
            spread = mean_sd(group, column.key)
            cells.append(f"{spread[0]:.2f} ± {spread[1]:.2f}" if spread and spread[1] is not None
                         else MISSING)
        rows.append(cells)
    return ["model", "decode", "seeds", *(c.label for c in keys)], rows


def test_set_names(systems: list[System]) -> list[str]:
    return sorted({name for s in systems for name in s.test_sets})


def write_markdown(report: Report, figures: list[Path], path: Path) -> None:
    shown = report.shown_columns()
    rows = [[cell(c, r[c.key]) for c in shown] for r in report.rows]
    md = ["# Results", report.about,
          markdown_table([c.label for c in shown], rows, [bool(c.fmt) for c in shown]),
          *notes(report)]
    cer = [c for c in report.extra if c.key.startswith("cer_")]
    if cer:
        md += ["## Character error rates", markdown_table(
            ["model", "decode", *(c.label for c in cer)],
            [[r["model"], r["decode"], *(cell(c, r[c.key]) for c in cer)] for r in report.rows],
            [False, False, *(True for _ in cer)])]
    header, seeds = over_seeds(report)
    if seeds:
        md += ["## Over seeds", markdown_table(header, seeds,
                                               [False, False, *(True for _ in header[2:])])]
    md.append("## Comparisons")
    header, rows, numeric = comparison_table(report)
    if rows:
        md.append(markdown_table(header, rows, numeric))
    md += left_out_lines(report.answers)
    if figures:
        md += ["## Figures", *(f"![{figure.stem}]({figure.name})" for figure in figures)]
    path.write_text("\n\n".join(md) + "\n", encoding="utf-8")


def write_text(report: Report, path: Path) -> None:
    shown = report.shown_columns()
    rows = [[cell(c, r[c.key]) for c in shown] for r in report.rows]
    txt = ["Results", report.about,
           text_table([c.label for c in shown], rows, [bool(c.fmt) for c in shown]),
           *notes(report), "Comparisons"]
    header, rows, numeric = comparison_table(report)
    if rows:
        txt.append(text_table(header, rows, numeric))
    txt += left_out_lines(report.answers)
    path.write_text("\n\n".join(txt) + "\n", encoding="utf-8")


def write_csv(report: Report, path: Path) -> None:
    keys = [c.key for c in report.table + report.extra]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        writer.writerows([csv_cell(row[key]) for key in keys] for row in report.rows)


def write_json(report: Report, figures: list[Path], path: Path) -> None:
    record = {
        "exp_dir": str(report.exp_dir),
        "columns": [asdict(c) for c in report.table + report.extra],
        "systems": [
            {"row": row, "model": asdict(s.model), "stale": s.stale,
             "test_sets": {name: test_set_record(t, report.exp_dir)
                           for name, t in s.test_sets.items()}}
            for s, row in zip(report.systems, report.rows)
        ],
        "comparisons": [c for a in report.answers for c in a.comparisons],
        "not_compared": {a.question: a.left_out for a in report.answers if a.left_out},
        "encoder_benchmarks": list(report.benchmarks),
        "figures": [figure.name for figure in figures],
    }
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def write_report(exp_dir: Path, out_dir: Path, samples: int = 2000) -> list[Path]:
    """Every output of the report; returns the paths written."""
    report = gather(exp_dir, out_dir, samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = write_plots(report, out_dir)
    outputs = [out_dir / name for name in ("RESULTS.md", "RESULTS.txt", "results.csv",
                                           "results.json")]
    write_markdown(report, figures, outputs[0])
    write_text(report, outputs[1])
    write_csv(report, outputs[2])
    write_json(report, figures, outputs[3])
    return outputs + figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m espnet_plugin.recipe.report",
        description="The study's tables, comparisons and figures over every scored decode.",
    )
    parser.add_argument("--exp_dir", default="exp", help="the recipe's exp folder")
    parser.add_argument("--out_dir", help="where the report goes (default: <exp_dir>/report)")
    parser.add_argument("--bootstrap_samples", type=int, default=2000,
                        help="resamples of each paired bootstrap")
    args = parser.parse_args(argv)
    exp_dir = Path(args.exp_dir)
    if not exp_dir.is_dir():
        raise UserError(f"--exp_dir {exp_dir} is not a folder; expected {LAYOUT}")
    out_dir = Path(args.out_dir) if args.out_dir else exp_dir / "report"
    for path in write_report(exp_dir, out_dir, args.bootstrap_samples):
        print(path)


if __name__ == "__main__":
    run(main)
