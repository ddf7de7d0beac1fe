"""A side channel for training losses that layers deep inside a model add to the objective.

ESPnet's encoders return ``(output, lengths, states)`` and nothing more, so a layer with a
regularizer of its own (dynamic chunking's ratio loss, a mixture-of-experts balance loss, ...)
records it on itself during the forward pass, and the model collects every record right after
(``espnet_plugin.asr_model``). Collecting pops the records, so no value is counted twice.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class AuxReport:
    """What auxiliary-loss layers recorded in one forward pass."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, to add to the loss
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, to log


class AuxLossMixin:
    """Mixin for ``nn.Module`` s that record auxiliary losses during their forward pass.

    Call ``report_aux`` once per forward pass; a second call before collection replaces the first.
    Losses must already carry their weight (the model adds them as they are); stats are logged.
    """

    def report_aux(self, losses: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
        self._aux_report = AuxReport(
            losses=dict(losses), stats={name: value.detach() for name, value in stats.items()}
        )

    def pop_aux(self) -> AuxReport | None:
        return self.__dict__.pop("_aux_report", None)


def collect_aux(model: torch.nn.Module) -> AuxReport:
    """Pop the records of every ``AuxLossMixin`` in ``model``, named ``<module path>.<name>``."""
    collected = AuxReport()
    for path, module in model.named_modules():
        report = module.pop_aux() if isinstance(module, AuxLossMixin) else None
        if report is None:
            continue
        prefix = f"{path}." if path else ""
        collected.losses.update({prefix + name: v for name, v in report.losses.items()})
        collected.stats.update({prefix + name: v for name, v in report.stats.items()})
    return collected
