"""Put the plugin's classes into ESPnet2's ``ClassChoices`` so YAML names resolve to them.

ESPnet builds its command-line parser from module-level ``ClassChoices`` objects in
``espnet2.tasks.*``; adding to their ``classes`` dict before a parser is built is all it takes for
``encoder: conmamba`` to work in training, inference and when a saved ``config.yaml`` is reloaded.

Importing a task module costs seconds (it imports all of ESPnet's models), so ``import
espnet_plugin`` does not: it registers into the task modules already imported and installs an
import hook that registers into the others the moment ESPnet imports them. Recipe steps that need
no model (scoring, data preparation) then import the package for free.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

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


def register_into(task: ModuleType) -> None:
    """Add the plugin's classes to the choices of one imported task module."""
    for choices_attr, entries in PLUGIN_CLASSES[task.__name__].items():
        for name, path in entries.items():
            add_choice(getattr(task, choices_attr), name, load_class(path))


class _RegisteringLoader(importlib.abc.Loader):
    """Runs a task module's own loader, then registers into the module it made."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        register_into(module)


class _TaskImportHook(importlib.abc.MetaPathFinder):
    """Finds a task module as Python would and wraps its loader in a registering one."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in PLUGIN_CLASSES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def register() -> None:
    """Register into every task module imported so far, and into the others when imported."""
    if not any(isinstance(finder, _TaskImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TaskImportHook())
    for task_module in PLUGIN_CLASSES:
        if task_module in sys.modules:
            register_into(sys.modules[task_module])
