"""Reading saved model weights: the safetensors files of a `save_pretrained` folder (single file or sharded index),
renamed to a model's parameter names and loaded strictly.

Used by `PaDTTrainer` to resume a run (see its module docstring, **Resume**) and by `padt.train.lora` to merge LoRA
adapters into a saved checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_saved_state_dict", "load_state_dict_strict", "to_model_keys", "weight_files"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(folder: str | os.PathLike) -> list[str] | None:
    """Names of the safetensors files of a `save_pretrained` folder: `model.safetensors`, or the shards its
    `model.safetensors.index.json` lists (sorted); None when it has neither."""
    folder = Path(folder)
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    if not (folder / INDEX_FILE).is_file():
        return None
    with open(folder / INDEX_FILE, encoding="utf-8") as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def load_saved_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The tensors of a `save_pretrained` folder (all shards, on the CPU, keys as saved); None without weights."""
    from safetensors.torch import load_file

    files = weight_files(folder)
    if files is None:
        return None
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name), device="cpu"))
    return state


def to_model_keys(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename saved (original-format) keys to the model's parameter names with the checkpoint conversion that
    transformers registers for the model's class (identity when there is none)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    mapping = get_checkpoint_conversion_mapping(type(model).__name__) or []
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    if not renamings:
        return state_dict
    return {apply_renamings(k, renamings): v for k, v in state_dict.items()}


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load saved weights into `model` after `to_model_keys`, raising `ValueError` (naming `source`) on any missing or
    unexpected key; tied weights (`_tied_weights_keys` with `tie_word_embeddings`) may be missing and are re-tied."""
    result = model.load_state_dict(to_model_keys(model, state_dict), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if model.config.tie_word_embeddings else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {source} does not match the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    if tied:
        model.tie_weights()
