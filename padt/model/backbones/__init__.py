"""Backbones PaDT runs on, one module each, behind one interface (`base.VisionLanguageBackbone`).

`padt_classes_for(path_or_config)` picks the PaDT config and model classes from a checkpoint's `config.json`
`model_type`, so loading code never names a backbone. Adding a backbone = one module + one line in `BACKBONES`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# model_type of the checkpoint's config.json -> module defining PaDTConfig-like and PaDT model classes
BACKBONES: dict[str, tuple[str, str, str]] = {
    "qwen2_5_vl": ("padt.model.backbones.qwen2_5_vl", "PaDTConfig", "PaDTForConditionalGeneration"),
}


def _lookup(model_type: str) -> tuple[str, str, str]:
    if model_type not in BACKBONES:
        from padt.model.loading import CheckpointError

        raise CheckpointError(
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


def padt_classes_for(pretrained: str | os.PathLike | Any, **hub_kwargs: Any) -> tuple[Any, Any]:
    """`(config class, model class)` for a checkpoint folder / hub id (read from its `config.json`) or a config object.

    `hub_kwargs` (`revision`, `cache_dir`, `local_files_only`, `token`, `trust_remote_code`, ...) go to
    `PretrainedConfig.get_config_dict`. A path that looks local but does not exist, or a folder without `config.json`,
    raises `FileNotFoundError` at once (`padt.model.loading.resolve_source`); an unsupported `model_type` raises
    `ValueError` naming it and the supported ones (both are `padt.model.loading.CheckpointError`s).
    """
    if hasattr(pretrained, "model_type") and not isinstance(pretrained, (str, os.PathLike)):
        model_type = pretrained.model_type
    else:
        from transformers import PretrainedConfig

        from padt.model.loading import CheckpointError, check_config_file, resolve_source

        folder = resolve_source(pretrained, **hub_kwargs)
        if folder is not None:
            check_config_file(folder)
        raw, _ = PretrainedConfig.get_config_dict(os.fspath(pretrained), **hub_kwargs)
        model_type = raw.get("model_type")
        if model_type is None:
            raise CheckpointError(f"{pretrained}: config.json has no model_type, so its backbone is unknown")
    return padt_config_class(model_type), padt_model_class(model_type)
