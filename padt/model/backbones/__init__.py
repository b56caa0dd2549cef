"""Backbones PaDT runs on, one module each, behind one interface (`base.VisionLanguageBackbone`).

`padt_model_class(model_type)` picks the PaDT model class for a checkpoint's `config.json` `model_type`, so loading
code never names a backbone. Adding a backbone = one module + one line in `BACKBONES`.
"""

from __future__ import annotations

import importlib
from typing import Any

# model_type of the checkpoint's config.json -> module defining PaDTConfig-like and PaDT model classes
BACKBONES: dict[str, tuple[str, str, str]] = {
    "qwen2_5_vl": ("padt.model.backbones.qwen2_5_vl", "PaDTConfig", "PaDTForConditionalGeneration"),
}


def _lookup(model_type: str) -> tuple[str, str, str]:
    if model_type not in BACKBONES:
        raise ValueError(
            f"no PaDT backbone for model_type={model_type!r}; supported: {sorted(BACKBONES)} "
            "(a backbone is one module in padt/model/backbones/, see base.py)"
        )
    return BACKBONES[model_type]


def padt_model_class(model_type: str) -> Any:
    """The PaDT model class for a backbone's `model_type` (e.g. `"qwen2_5_vl"`)."""
    module, _, model = _lookup(model_type)
    return getattr(importlib.import_module(module), model)


def padt_config_class(model_type: str) -> Any:
    """The PaDT config class for a backbone's `model_type`."""
    module, config, _ = _lookup(model_type)
    return getattr(importlib.import_module(module), config)
