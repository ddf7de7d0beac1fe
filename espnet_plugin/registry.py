"""Put the plugin's classes into ESPnet2's ``ClassChoices`` so YAML names resolve to them.

ESPnet builds its command-line parser from module-level ``ClassChoices`` objects in
``espnet2.tasks.*``; adding to their ``classes`` dict before a parser is built is all it takes for
``encoder: conmamba`` to work in training, inference and when a saved ``config.yaml`` is reloaded.
"""

import importlib

from espnet2.train.class_choices import ClassChoices

# task module -> choices attribute -> YAML name -> "module:Class" of ours.
PLUGIN_CLASSES: dict[str, dict[str, dict[str, str]]] = {
    "espnet2.tasks.asr": {
        "encoder_choices": {
            "conmamba": "espnet_plugin.nets.encoders:ConMambaEncoder",
            "conformer_x": "espnet_plugin.nets.encoders:ConformerXEncoder",
            "branchformer_x": "espnet_plugin.nets.encoders:BranchformerXEncoder",
        },
        "decoder_choices": {
            "cached_transformer": "espnet_plugin.nets.transformer_decoder:CachedTransformerDecoder",
        },
        "model_choices": {"espnet_aux": "espnet_plugin.asr_model:ESPnetAuxLossASRModel"},
    },
    "espnet2.tasks.lm": {
        "lm_choices": {},
    },
}


def add_choice(choices: ClassChoices, name: str, cls: type) -> None:
    """Register ``cls`` under ``name``, checked against the choice's base type."""
    name = name.lower()
    if choices.base_type is not None and not issubclass(cls, choices.base_type):
        raise TypeError(
            f"cannot register {cls.__module__}.{cls.__qualname__} as --{choices.name} {name}: "
            f"it must subclass {choices.base_type.__module__}.{choices.base_type.__qualname__}"
        )
    existing = choices.classes.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"--{choices.name} {name} is already taken by "
            f"{existing.__module__}.{existing.__qualname__}"
        )
    choices.classes[name] = cls


def load_class(path: str) -> type:
    module_name, _, class_name = path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def register() -> None:
    """Register every plugin class into the ESPnet tasks that exist in this espnet."""
    for task_module, table in PLUGIN_CLASSES.items():
        try:
            task = importlib.import_module(task_module)
        except ModuleNotFoundError as err:
            if err.name is None or not task_module.startswith(err.name):
                raise
            continue  # this espnet has no such task
        for choices_attr, entries in table.items():
            choices = getattr(task, choices_attr, None)
            if choices is None:
                continue
            for name, path in entries.items():
                add_choice(choices, name, load_class(path))
