"""Auxiliary losses: the hook through which a loss term that is not PaDT's own joins the criterion, with no branch in
the training step.

An auxiliary loss is any object with a `name` and a `__call__(model, batch, outputs) -> (loss, logs)`
(`AuxiliaryLoss`). `PaDTCriterion(auxiliary_losses=[...])` runs it on every batch (`padt.train.step`); its loss is
logged as ``loss_<name>`` and weighed, like every other term, by the criterion's `weight_dict`, whose entry comes from
the training argument ``<name>_loss_coef`` (`padt.train.trainer.build_criterion`). Its `logs` (metrics such as an
accuracy) are logged as they are and never summed.

Auxiliary losses switched on by training arguments are listed in `AUXILIARY_LOSSES`, the one place where
`padt.train` names code outside it. An entry maps the name to ``"module:Class"``, imported only when used; the class
provides

* ``check_args(args)``: validates its arguments (`PaDTTrainingArguments.__post_init__` calls it), and
* ``from_args(args, processing_class)``: the loss to add when ``args.<name>_loss_coef > 0``.

`python -m padt.train` builds them with `auxiliary_losses_from_args` and passes them to `PaDTTrainer`. The shapes
benchmark's cell-class loss (`padt.shapes.cell_class_loss.CellClassLoss`; flags `--cell_class_loss_coef`,
`--cell_class_names`, `--cell_class_match`) is the one registered today. A new entry also needs its
``<name>_loss_coef`` field (and any other flag it reads) in `PaDTTrainingArguments`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "AUXILIARY_LOSSES",
    "AuxiliaryLoss",
    "auxiliary_losses_from_args",
    "check_auxiliary_args",
    "check_auxiliary_wiring",
    "coef_field",
    "loss_key",
]

# name -> "module:Class" with `check_args(args)` and `from_args(args, processing_class)` (see the module docstring)
AUXILIARY_LOSSES: dict[str, str] = {
    "cell_class": "padt.shapes.cell_class_loss:CellClassLoss",
}


@runtime_checkable
class AuxiliaryLoss(Protocol):
    """A loss term outside PaDT's own, run by `PaDTCriterion` on every training batch.

    Attributes:
        name (`str`): the term's name: logged as ``loss_<name>``, weighed by ``weight_dict["loss_<name>"]``, which the
            training argument ``<name>_loss_coef`` sets.
    """

    name: str

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Any], outputs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The unweighted loss of one batch and its metrics.

        Args:
            model: the model as the step received it (possibly wrapped: DDP, DeepSpeed; see
                `padt.train.step.unwrap_padt_model`).
            batch: the collator's batch (`padt.data.collator`).
            outputs: the model's forward output for `batch` (its `padt_state` holds the batch's image state).
        Returns:
            `(loss, logs)`: a differentiable scalar, and detached scalar metrics (names not starting with ``loss_``).
        """
        ...


def loss_key(name: str) -> str:
    """The logged key and `weight_dict` key of an auxiliary loss: ``loss_<name>``."""
    return f"loss_{name}"


def coef_field(name: str) -> str:
    """The training argument holding an auxiliary loss's weight: ``<name>_loss_coef``."""
    return f"{name}_loss_coef"


def _builder(name: str) -> Any:
    module, attr = AUXILIARY_LOSSES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def check_auxiliary_args(args: Any) -> None:
    """Validate the arguments of every registered auxiliary loss (`ValueError` naming the flag)."""
    for name in AUXILIARY_LOSSES:
        _builder(name).check_args(args)


def auxiliary_losses_from_args(args: Any, processing_class: Any = None) -> list[AuxiliaryLoss]:
    """The registered auxiliary losses whose ``<name>_loss_coef`` is > 0, built from the training arguments (and the
    processor, e.g. to tokenise class names)."""
    return [_builder(name).from_args(args, processing_class) for name in AUXILIARY_LOSSES
            if getattr(args, coef_field(name), 0) > 0]


def check_auxiliary_wiring(args: Any, loss_keys: Iterable[str]) -> None:
    """`ValueError` when a registered auxiliary loss is switched on in `args` but is not among the criterion's
    `loss_keys` (a `PaDTTrainer` built without the `auxiliary_losses` its arguments ask for)."""
    keys = set(loss_keys)
    for name in AUXILIARY_LOSSES:
        if getattr(args, coef_field(name), 0) > 0 and loss_key(name) not in keys:
            raise ValueError(
                f"{coef_field(name)} > 0 but the criterion has no {loss_key(name)} term: pass "
                "auxiliary_losses=padt.train.auxiliary.auxiliary_losses_from_args(args, processor) to PaDTTrainer "
                "(as python -m padt.train does)"
            )
