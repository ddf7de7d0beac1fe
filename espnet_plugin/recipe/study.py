"""The whole study in one command: ``./run_study.sh`` in a recipe folder.

A study is a YAML file of models (``conf/study.yaml``), each a name and the ``run.sh`` options that
make it: a training config (``asr_config``), or a model of the study to fine-tune
(``finetune_from``), its attention converted first (``convert_args``); ``seeds: [0, 1, 2]`` makes
one model per seed, ``<name>_seed<k>`` trained with ESPnet's ``--seed k`` (a fine-tuned entry
whose source has seeds fine-tunes each seed from the same seed of the source). The driver prepares the
data once (stages 1-3) and the statistics of each frontend (stage 4), then has every model trained,
decoded, scored and profiled (stages 5-10, in ``exp/asr_<name>``; a fine-tuned model after the
one it starts from), and ends with the report (stage 11). What is done is found from the outputs
themselves: ``run.sh --dry_run true`` says whether anything of a model is missing or stale, so a
re-run after a crash or a pre-emption skips the finished models and resumes an interrupted
training from its checkpoint. ``--jobs N`` runs N models at once, each on its own GPU of ``--gpus``
or through ``--launch_prefix`` (``"srun --gres=gpu:1"``: a scheduler, as ESPnet's cmd.sh does).
Options after ``--`` go to every ``run.sh`` call.

    ./run_study.sh                                   # every model, one after the other
    ./run_study.sh --models conformer_mha,conformer_mla -- --ngpu 1
    ./run_study.sh --jobs 4 --gpus 0,1,2,3
    ./run_study.sh --dry_run                         # what is done and what is left
"""

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from espnet_plugin.cli import UserError, run

DRY_RUN_SUMMARY = "Dry run: "
SOURCE_KEY = "finetune_from"
TRAINING_KEYS = ("asr_config", SOURCE_KEY)
SEEDS_KEY = "seeds"


@dataclass
class Model:
    """One model of the study: its name and the run.sh options that make it."""

    name: str
    options: dict[str, str]
    source: str | None = None  # the model it is fine-tuned from
    log: Path | None = None
    status: str = "pending"
    minutes: float | None = None
    waits_for: list[str] = field(default_factory=list)

    def run_options(self, expdir: str) -> list[str]:
        options = ["--asr_tag", self.name]
        for key, value in self.options.items():
            if key == SOURCE_KEY:
                value = f"{expdir}/asr_{value}"
            options += [f"--{key}", str(value)]
        return options


def read_seeds(path: Path, name: str, options) -> list[int] | None:
    """An entry's ``seeds``: distinct whole numbers >= 0; None where it has none."""
    if not isinstance(options, dict) or SEEDS_KEY not in options:
        return None
    value = options[SEEDS_KEY]
    if (not isinstance(value, list) or not value or len(set(value)) != len(value)
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in value)):
        raise UserError(f"{path}: model {name}: seeds must be a list of distinct whole numbers "
                        f">= 0 (seeds: [0, 1, 2]), got {value!r}")
    return value


def seeded(name: str, options: dict[str, str], source: str | None, seed: int | None,
           source_seeded: bool) -> Model:
    """The model of one seed of an entry: ``<name>_seed<k>`` trained with ``--seed k``, fine-tuned
    from the same seed of its source where that has seeds."""
    if seed is None:
        return Model(name, options, source)
    options = dict(options)
    options["asr_args"] = f"{options.get('asr_args', '')} --seed {seed}".strip()
    if source is not None and source_seeded:
        source = f"{source}_seed{seed}"
        options[SOURCE_KEY] = source
    return Model(f"{name}_seed{seed}", options, source)


def load_study(path: Path, selection: list[str] | None) -> list[Model]:
    """The study's models (the selected ones and those they start from), in a valid order."""
    if not path.is_file():
        raise UserError(f"--study {path}: no such file")
    try:
        study = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})") from err
    entries = (study or {}).get("models") if isinstance(study, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise UserError(f"{path}: expected 'models:' mapping each model name to its run.sh options")
    models = {}
    for name, options in entries.items():
        if not isinstance(options, dict):
            raise UserError(f"{path}: model {name}: expected a mapping of run.sh options")
        if sum(key in options for key in TRAINING_KEYS) != 1:
            raise UserError(f"{path}: model {name}: give either asr_config (train) or "
                            f"finetune_from (fine-tune a model of the study)")
        if "asr_config" in options and not Path(options["asr_config"]).is_file():
            raise UserError(f"{path}: model {name}: asr_config {options['asr_config']} does not exist")
        source = options.get(SOURCE_KEY)
        if source is not None and source not in entries:
            raise UserError(f"{path}: model {name}: finetune_from {source} is not a model of the "
                            f"study ({', '.join(entries)})")
    seeds = {name: read_seeds(path, name, options) for name, options in entries.items()}
    entry_of = {}  # model name -> its study entry
    for name, options in entries.items():
        source = options.get(SOURCE_KEY)
        source_seeds = seeds[source] if source is not None else None
        own = seeds[name] or source_seeds
        if own and source_seeds and not set(own) <= set(source_seeds):
            raise UserError(f"{path}: model {name}: seeds {own} are not all seeds of its "
                            f"finetune_from {source} ({source_seeds})")
        options = {k: str(v) for k, v in options.items() if k != SEEDS_KEY}
        for seed in own or [None]:
            model = seeded(name, options, source, seed, bool(source_seeds))
            models[model.name] = model
            entry_of[model.name] = name
    if selection is not None:  # an entry with seeds selects all of them
        selection = [m for chosen in selection for m in
                     ([x for x, e in entry_of.items() if e == chosen and x != chosen] or [chosen])]
    chosen = list(models) if selection is None else selection
    unknown = [name for name in chosen if name not in models]
    if unknown:
        raise UserError(f"--models: {', '.join(unknown)} not in {path} "
                        f"(its models: {', '.join(models)})")
    ordered: list[Model] = []

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise UserError(f"{path}: models fine-tune from each other in a circle: "
                            f"{' -> '.join((*chain, name))}")
        model = models[name]
        if model.source is not None:
            add(model.source, (*chain, name))
        if model not in ordered:
            ordered.append(model)

    for name in chosen:
        add(name, ())
    return ordered


class Recipe:
    """Runs the recipe's run.sh, each call logged under ``<expdir>/study/``."""

    def __init__(self, expdir: str, passthrough: list[str], launch_prefix: str):
        self.expdir = expdir
        self.passthrough = passthrough
        self.launch_prefix = shlex.split(launch_prefix)
        self.logs = Path(expdir) / "study"
        self.logs.mkdir(parents=True, exist_ok=True)

    def command(self, *options: str) -> list[str]:
        return [*self.launch_prefix, "./run.sh", "--expdir", self.expdir, *options,
                *self.passthrough]

    def start(self, log: Path, *options: str, gpu: str | None = None) -> subprocess.Popen:
        env = dict(os.environ)
        extra = []
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
            extra = ["--ngpu", "1"]
        with open(log, "w", encoding="utf-8") as out:
            out.write(shlex.join(self.command(*options, *extra)) + "\n")
            out.flush()
            return subprocess.Popen(self.command(*options, *extra), stdout=out,
                                    stderr=subprocess.STDOUT, env=env)

    def run(self, name: str, *options: str) -> None:
        """Run to the end; a failure stops the study with the end of its log."""
        log = self.logs / f"{name}.log"
        if self.start(log, *options).wait() != 0:
            tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-15:])
            raise UserError(f"run.sh {' '.join(options)} failed (log {log}):\n{tail}")

    def outputs_left(self, model: Model) -> int | None:
        """Outputs of stages 4-10 that a model still lacks or has stale, by run.sh's dry run;
        None when its dry run fails (e.g. the model it starts from is not there yet)."""
        log = self.logs / f"{model.name}.status.log"
        self.start(log, "--stage", "4", "--stop_stage", "10", "--dry_run", "true",
                   *model.run_options(self.expdir)).wait()
        for line in reversed(log.read_text(encoding="utf-8").splitlines()):
            if DRY_RUN_SUMMARY in line:
                return int(line.split(DRY_RUN_SUMMARY)[1].split()[0])
        return None


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def run_study(models: list[Model], recipe: Recipe, jobs: int, gpus: list[str]) -> list[Model]:
    """Train, decode, score and profile the models that are not done, ``jobs`` at a time, each
    after the model it starts from; returns the models that failed."""
    done = {m.name for m in models if m.status == "done"}
    todo = [m for m in models if m.status != "done"]
    running: dict[str, tuple[subprocess.Popen, Model, str | None, float]] = {}
    failed: list[Model] = []
    free_gpus = list(gpus)
    while todo or running:
        ready = [m for m in todo if m.source is None or m.source in done]
        while ready and len(running) < jobs:
            model = ready.pop(0)
            todo.remove(model)
            gpu = free_gpus.pop(0) if free_gpus else None
            model.log = recipe.logs / f"{model.name}.log"
            process = recipe.start(model.log, "--stage", "5", "--stop_stage", "10",
                                   *model.run_options(recipe.expdir), gpu=gpu)
            running[model.name] = (process, model, gpu, time.time())
            say(f"started {model.name}{'' if gpu is None else f' on GPU {gpu}'} "
                f"(log {model.log})")
        if not running:  # what is left waits for a model that failed
            for model in todo:
                model.status = f"not run: {model.source} failed"
                failed.append(model)
            break
        time.sleep(2)
        for name, (process, model, gpu, began) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if gpu is not None:
                free_gpus.append(gpu)
            model.minutes = (time.time() - began) / 60
            if process.returncode == 0:
                model.status = "done"
                done.add(name)
            else:
                model.status = f"failed (see {model.log})"
                failed.append(model)
            left = [m.name for m in todo] + list(running)
            say(f"{name}: {model.status} after {model.minutes:.1f} min; "
                f"left: {', '.join(left) or 'nothing'}")
    return failed


def print_status(models: list[Model]) -> None:
    width = max(len(m.name) for m in models)
    for model in models:
        print(f"  {model.name:<{width}}  {model.status}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="run_study.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path("conf/study.yaml"),
                        help="the study's models")
    parser.add_argument("--models", help="comma-separated names: only these (and those they "
                                         "start from)")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids, one per running model")
    parser.add_argument("--launch_prefix", default="",
                        help="prefix of every model's run.sh, e.g. 'srun --gres=gpu:1 -c 8'")
    parser.add_argument("--expdir", default="exp")
    parser.add_argument("--dry_run", action="store_true", help="say what is done and what is left")
    args = parser.parse_args(argv)
    if not Path("run.sh").is_file():
        raise UserError("run from a recipe folder (egs2/<corpus>/asr1): no run.sh here")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: need at least 1")
    gpus = [g for g in args.gpus.split(",") if g]
    if gpus and len(gpus) < args.jobs:
        raise UserError(f"--gpus {args.gpus}: {args.jobs} jobs need as many GPUs")
    selection = None if args.models is None else [m for m in args.models.split(",") if m]
    models = load_study(args.study, selection)
    recipe = Recipe(args.expdir, passthrough, args.launch_prefix)

    say(f"study {args.study}: {len(models)} models; logs in {recipe.logs}/")
    if not args.dry_run:
        say("stages 1-3: data, formatting, tokens")
        recipe.run("prepare", "--stage", "1", "--stop_stage", "3")
        configs = set()  # the statistics of every frontend, before models run side by side
        for model in models:  # once per config: the seeds of a model share theirs
            if "asr_config" in model.options and model.options["asr_config"] not in configs:
                configs.add(model.options["asr_config"])
                recipe.run(f"{model.name}.stats", "--stage", "4", "--stop_stage", "4",
                           "--asr_config", model.options["asr_config"])
    known = {}
    for model in models:
        if model.source is not None and known.get(model.source) != 0:
            model.status = f"waits for {model.source}"
            continue
        left = recipe.outputs_left(model)
        known[model.name] = left
        model.status = ("done" if left == 0 else
                        f"to do ({left} outputs missing or stale)" if left else "to do")
    say("status:")
    print_status(models)
    if args.dry_run:
        return
    failed = run_study(models, recipe, args.jobs, gpus)
    say("stage 11: the report")
    recipe.run("report", "--stage", "11", "--stop_stage", "11")
    say(f"report: {args.expdir}/report/RESULTS.md")
    print_status(models)
    if failed:
        raise UserError(f"{len(failed)} model(s) failed: {', '.join(m.name for m in failed)}")


if __name__ == "__main__":
    run(main)
