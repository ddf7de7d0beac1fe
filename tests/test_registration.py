"""Importing espnet_plugin puts every plugin class into ESPnet's own ClassChoices, checked against
the choice's base type, and an unknown name fails with ESPnet's error listing ours too."""

import importlib

import pytest
import torch
import yaml

import espnet_plugin  # noqa: F401
from espnet_plugin.registry import PLUGIN_CLASSES, add_choice, load_class

REGISTERED = [
    (task, attr, name, path)
    for task, table in PLUGIN_CLASSES.items()
    for attr, entries in table.items()
    for name, path in entries.items()
]


def test_the_plugin_registers_something():
    assert any(attr == "encoder_choices" for _, attr, _, _ in REGISTERED)


@pytest.mark.parametrize("task, attr, name, path", REGISTERED)
def test_each_class_resolves_through_espnet(task, attr, name, path):
    choices = getattr(importlib.import_module(task), attr)
    assert choices.get_class(name) is load_class(path)
    assert name in choices.choices()
    if choices.base_type is not None:
        assert issubclass(load_class(path), choices.base_type)


def test_a_class_of_the_wrong_type_is_refused():
    from espnet2.tasks.asr import encoder_choices

    with pytest.raises(TypeError, match=r"--encoder not_an_encoder: it must subclass .*AbsEncoder"):
        add_choice(encoder_choices, "not_an_encoder", torch.nn.Linear)
    assert "not_an_encoder" not in encoder_choices.classes


def test_a_taken_name_is_refused():
    from espnet2.tasks.asr import encoder_choices

    with pytest.raises(ValueError, match="--encoder conformer is already taken"):
        add_choice(encoder_choices, "conformer", load_class(PLUGIN_CLASSES["espnet2.tasks.asr"]["encoder_choices"]["conmamba"]))


def test_unknown_encoder_in_yaml_lists_the_valid_choices(tmp_path):
    from espnet2.tasks.asr import ASRTask

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"encoder": "conmambaa", "input_size": 20, "frontend": None,
                                      "token_list": ["<blank>", "a", "<sos/eos>"]}))
    args = ASRTask.get_parser().parse_args(["--config", str(config)])
    with pytest.raises(ValueError, match=r"--encoder must be one of \(.*'conmamba'.*\): --encoder conmambaa"):
        ASRTask.build_model(args)


def test_unknown_encoder_on_the_command_line_lists_the_valid_choices(capsys):
    from espnet2.tasks.asr import ASRTask

    with pytest.raises(SystemExit):
        ASRTask.get_parser().parse_args(["--encoder", "conmambaa"])
    assert "conmamba" in capsys.readouterr().err
