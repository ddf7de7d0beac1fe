"""The questions the study asks of its models, and their answers: for each question the pairs of
models that answer it, matched on what their configs and stamps say (encoder, attention, how the
model was made, dynamic chunking and its design, size and input layer), never on their names; for
each pair a paired bootstrap of the WER difference on every test set both decoded with the same
options, on the same utterances.

    per encoder:     mha -> mla, mla -> gqa, mha -> linear (same size, trained from scratch)
    per attention:   conformer -> branchformer
    once:            conformer mha -> conmamba; conmamba -> conmamba with dynamic chunking
    per converted:   the same architecture (dynamic chunking's design included) trained from
    (its seeds one   scratch -> the converted model;
    question)        its source fine-tuned without conversion -> the converted model

A is the reference of each question, B the alternative: differences are B - A, in WER points.
"""

from dataclasses import asdict, dataclass

from espnet_plugin.recipe.compare import paired_bootstrap, pooled_bootstrap
from espnet_plugin.recipe.study_layout import (
    ATTENTION_ORDER,
    ENCODER_ORDER,
    NO_ATTENTION,
    Model,
    System,
    ordered,
)


@dataclass(frozen=True)
class Question:
    title: str
    pairs: list[tuple[Model, Model]]  # (A, B): the models that answer it, A the reference


def _matches(model: Model, **wanted) -> bool:
    """The model's or its architecture's attributes have the wanted values."""
    return all(getattr(model.arch if hasattr(model.arch, key) else model, key) == value
               for key, value in wanted.items())


def study_questions(models: list[Model]) -> list[Question]:
    """The study's questions, each with the model pairs (matched on metadata) that answer it."""
    scratch = [m for m in models if m.origin == "scratch"]

    def pairs(a: dict, b: dict, same_size: bool) -> list[tuple[Model, Model]]:
        # Always at one frame rate (input layer); with same_size, at one size too.
        alike = (lambda m: m.arch.shape) if same_size else (lambda m: m.arch.input_layer)
        return _seeded_first([(x, y) for x in scratch if _matches(x, **a) for y in scratch
                              if y is not x and _matches(y, **b) and alike(x) == alike(y)])

    with_attention = [m.arch.encoder for m in models if m.arch.attention != NO_ATTENTION]
    encoders = ordered(["conformer", "branchformer", *with_attention], ENCODER_ORDER)
    attentions = ordered([*ATTENTION_ORDER, *(m.arch.attention for m in models)], ATTENTION_ORDER)
    questions = [
        Question(f"{encoder}: {a} -> {b}",
                 pairs(dict(encoder=encoder, attention=a, chunking=False),
                       dict(encoder=encoder, attention=b, chunking=False), same_size=True))
        for encoder in encoders for a, b in (("mha", "mla"), ("mla", "gqa"), ("mha", "linear"))
    ]
    questions += [
        Question(f"{attention}: conformer -> branchformer",
                 pairs(dict(encoder="conformer", attention=attention, chunking=False),
                       dict(encoder="branchformer", attention=attention, chunking=False),
                       same_size=False))
        for attention in attentions if attention != NO_ATTENTION
    ]
    questions.append(Question("conformer mha -> conmamba", pairs(
        dict(encoder="conformer", attention="mha", chunking=False),
        dict(encoder="conmamba", chunking=False), same_size=False)))
    questions.append(Question("conmamba -> conmamba with dynamic chunking", pairs(
        dict(encoder="conmamba", chunking=False), dict(encoder="conmamba", chunking=True),
        same_size=True)))
    converted_groups: dict[str, list[Model]] = {}
    for model in models:
        if model.origin == "converted":
            converted_groups.setdefault(model.group, []).append(model)
    for group, seeds in converted_groups.items():  # one question for all seeds: they pool
        what = f"{group} ({seeds[0].arch.encoder} {_conversion_label(seeds[0])})"
        questions.append(Question(f"{what}: trained from scratch -> converted", _seeded_first(
            [(m, c) for c in seeds for m in scratch if m.arch == c.arch])))
        questions.append(Question(f"{what}: fine-tuned without conversion -> converted", [
            (m, c) for c in seeds for m in models
            if m.origin == "finetuned" and m.finetune_from == c.finetune_from]))
    return questions


def _seeded_first(pairs: list[tuple[Model, Model]]) -> list[tuple[Model, Model]]:
    """Where models with seeds answer a question, only they do: a model without one (the recipe's
    main job beside the study's seeds of its config) would be paired with every seed."""
    seeded = [(x, y) for x, y in pairs if None not in (x.seed, y.seed)]
    return seeded or pairs


def _conversion_label(model: Model) -> str:
    """What the conversion changed: the attention ("mla (from mha)"), or a router inserted."""
    if model.arch.chunking and model.source is not None and not model.source.chunking:
        return "dynamic chunking inserted"
    return model.attention_label


@dataclass
class Answer:
    question: str
    comparisons: list[dict]
    left_out: str = ""  # why there is no comparison: "models absent", ...


def answer(question: Question, systems: list[System], samples: int) -> Answer:
    """Paired bootstraps of the WER of every current decode pair with the same decoding options
    (of the same seed, where both have seeds), on each test set both decoded (same utterances),
    and pooled over the seeds."""
    if not question.pairs:
        return Answer(question.title, [], "models absent")
    comparisons, reasons = [], set()
    for model_a, model_b in question.pairs:
        if None not in (model_a.seed, model_b.seed) and model_a.seed != model_b.seed:
            continue  # a seed is compared with the same seed; across seeds only pooled
        for a in (s for s in systems if s.model is model_a):
            for b in (s for s in systems if s.model is model_b):
                if a.stale or b.stale:
                    reasons.add("stale")
                    continue
                if a.decoding != b.decoding:
                    reasons.add("no decode with the same options")
                    continue
                for name in sorted(a.test_sets.keys() & b.test_sets.keys()):
                    counts_a = a.test_sets[name].counts.get("word")
                    counts_b = b.test_sets[name].counts.get("word")
                    if counts_a is None or counts_b is None:
                        reasons.add("scored without utterances.json: score again with "
                                    "asr.sh --stage 9 --stop_stage 9 --overwrite true")
                    elif counts_a.keys() != counts_b.keys():
                        reasons.add("not the same utterances")
                    else:
                        result = paired_bootstrap(counts_a, counts_b, samples)
                        comparisons.append({
                            "question": question.title, "a": a.name, "b": b.name,
                            "test_set": name, "unit": "word", **asdict(result),
                            "excludes_zero": result.excludes_zero,
                        })
                if not a.test_sets.keys() & b.test_sets.keys():
                    reasons.add("no test set in common")
    comparisons += pooled(question, systems, samples)
    return Answer(question.title, comparisons, "" if comparisons else ", ".join(sorted(reasons)))


def pooled(question: Question, systems: list[System], samples: int) -> list[dict]:
    """Per pair of models where one has several seeds: the bootstrap pooled over their seeds, on
    each test set every seed decoded with the first seed's options (current decodes only)."""
    groups: dict[tuple[str, str], tuple[set, set]] = {}
    for model_a, model_b in question.pairs:
        seeds_a, seeds_b = groups.setdefault((model_a.group, model_b.group), (set(), set()))
        seeds_a.add(model_a)
        seeds_b.add(model_b)
    comparisons = []
    for (group_a, group_b), (models_a, models_b) in groups.items():
        if len(models_a) < 2 and len(models_b) < 2:
            continue
        current = [s for s in systems if not s.stale]
        for first in (s for s in current if s.model in models_a):
            side_a = [s for s in current if s.model in models_a and s.decoding == first.decoding]
            side_b = [s for s in current if s.model in models_b and s.decoding == first.decoding]
            if first is not side_a[0] or not side_b:
                continue
            names = set.intersection(*(set(s.test_sets) for s in side_a + side_b))
            for name in sorted(names):
                counts = [s.test_sets[name].counts.get("word") for s in side_a + side_b]
                if any(c is None for c in counts) or any(c.keys() != counts[0].keys()
                                                         for c in counts):
                    continue
                result = pooled_bootstrap(counts[:len(side_a)], counts[len(side_a):], samples)
                comparisons.append({
                    "question": f"{question.title} (pooled over seeds)",
                    "a": f"{group_a}/{first.decode}", "b": f"{group_b}/{side_b[0].decode}",
                    "test_set": name, "unit": "word", **asdict(result),
                    "excludes_zero": result.excludes_zero,
                })
    return comparisons
