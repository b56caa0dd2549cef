"""`PaDTCausalLMOutput` behaves exactly like a transformers `ModelOutput` (its faster `__setattr__` included)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from transformers.utils import ModelOutput

from padt.model.outputs import PaDTCausalLMOutput


@dataclass
class _Reference(ModelOutput):
    """The same fields on transformers' own `ModelOutput.__setattr__`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    rope_deltas: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    past_image_embeds: torch.Tensor | None = None
    past_logit_mask: torch.Tensor | None = None
    past_high_res_image_embeds: torch.Tensor | None = None
    past_visual_pe: tuple | None = None
    padt_state: object = None


def test_reference_has_the_same_fields():
    assert [f.name for f in dataclasses.fields(_Reference)] == [f.name for f in dataclasses.fields(PaDTCausalLMOutput)]


@pytest.mark.parametrize("given", [
    {"logits": torch.ones(1, 2)},
    {"loss": torch.tensor(1.0), "logits": torch.zeros(2), "padt_state": "state", "past_visual_pe": (torch.ones(1),)},
    {"logits": torch.ones(3), "rope_deltas": None, "last_hidden_state": torch.ones(1, 1, 2)},
])
def test_same_items_attributes_and_tuples(given):
    ours, ref = PaDTCausalLMOutput(**given), _Reference(**given)
    in_field_order = [f.name for f in dataclasses.fields(_Reference) if given.get(f.name) is not None]
    assert list(ours.keys()) == list(ref.keys()) == in_field_order
    for field in dataclasses.fields(_Reference):
        assert getattr(ours, field.name) is getattr(ref, field.name)
    assert all(a is b for a, b in zip(ours.to_tuple(), ref.to_tuple(), strict=True))
    assert ours[0] is ref[0]


def test_assignment_after_construction():
    ours, ref = PaDTCausalLMOutput(logits=torch.ones(1)), _Reference(logits=torch.ones(1))
    for out in (ours, ref):
        out.loss = torch.tensor(2.0)  # a field: becomes an item too
        out.logits = None  # None: the attribute changes, the item stays (transformers' behaviour)
        out.extra = 5  # not a field: attribute only
    assert list(ours.keys()) == list(ref.keys()) == ["logits", "loss"]
    assert ours.logits is None and ref.logits is None and ours["logits"].item() == ref["logits"].item() == 1.0
    assert ours.extra == ref.extra == 5 and "extra" not in ours
    ours["loss"] = torch.tensor(3.0)
    assert ours.loss.item() == 3.0


def test_field_names_are_computed_once(monkeypatch):
    """transformers recomputes `dataclasses.fields` on every assignment (quadratic in the fields); ours does not."""
    PaDTCausalLMOutput(logits=torch.ones(1))  # warm the per-class cache
    import padt.model.outputs as outputs_module

    calls = []
    real = outputs_module.fields
    monkeypatch.setattr(outputs_module, "fields", lambda *a: calls.append(1) or real(*a))
    PaDTCausalLMOutput(logits=torch.ones(1), loss=torch.tensor(0.0), padt_state="s")
    assert calls == []
