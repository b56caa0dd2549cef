"""Reading saved model weights: the safetensors files of a `save_pretrained` folder (single file or sharded index),
renamed to a model's parameter names and loaded strictly.

Used by `PaDTTrainer` to resume a run (see its module docstring, **Resume**) and by `padt.train.lora` to merge LoRA
adapters into a saved checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from torch import nn

from padt.model.loading import safetensors_problem

__all__ = ["checkpoint_problem", "complete_checkpoints", "load_saved_state_dict", "load_state_dict_strict",
           "save_error", "to_model_keys", "weight_files"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TRAINER_STATE_FILE = "trainer_state.json"
# torch.save (zip) files of a checkpoint that the Trainer loads when resuming, when present
_TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


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


# ============================================================================ complete checkpoints (resume)
def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint to resume from, or None when it is.

    Complete: `trainer_state.json` (written last by the Trainer) parses; the weights are there, i.e.
    `model.safetensors`, or `model.safetensors.index.json` and every shard it lists, each as long as its header says
    (or a DeepSpeed `latest` tag naming an existing folder); and `optimizer.pt` / `scheduler.pt` / `scaler.pt`, where
    present, are whole zip archives (a write cut short loses the archive's directory at the end).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        state = json.loads((folder / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{TRAINER_STATE_FILE} is missing"
    except (OSError, ValueError) as exc:
        return f"{TRAINER_STATE_FILE} does not parse ({exc})"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{TRAINER_STATE_FILE} has no global_step"
    latest = folder / "latest"  # DeepSpeed engine checkpoint: its tag folder holds the weights
    if latest.is_file() and (folder / latest.read_text(encoding="utf-8").strip()).is_dir():
        names: list[str] | None = []
    elif (folder / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    elif (folder / INDEX_FILE).is_file():
        try:
            names = weight_files(folder)
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            return f"{INDEX_FILE} does not parse ({exc})"
    else:
        return f"no weights ({SINGLE_FILE} or {INDEX_FILE})"
    for name in names or ():
        problem = safetensors_problem(folder / name)
        if problem:
            return problem
    for name in _TORCH_FILES:
        path = folder / name
        if path.exists() and not zipfile.is_zipfile(path):
            return f"{name} is truncated or not a torch.save archive"
    return None


def complete_checkpoints(output_dir: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """(`checkpoint-N` folders of `output_dir` that are complete, newest (largest N) first; {incomplete folder: why})."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = _CHECKPOINT_NAME.match(name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                found.append((int(match.group(1)), os.path.join(output_dir, name)))
    complete, skipped = [], {}
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem:
            skipped[path] = problem
        else:
            complete.append(path)
    return complete, skipped


# ============================================================================ save errors
def save_error(exc: BaseException, path: str | os.PathLike) -> OSError | None:
    """An `OSError` saying what went wrong writing to `path` (errno, reason, free space), for an `OSError` or for the
    `RuntimeError` torch.save raises on a failed write (`basic_ios::clear`, `file write failed`); None for any other
    error (re-raise it unchanged)."""
    if isinstance(exc, OSError):
        code, reason = exc.errno, exc.strerror or str(exc)
    elif isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("basic_ios", "file write failed", "PytorchStreamWriter", "inline_container")
    ):
        code, reason = None, f"the write failed ({' '.join(str(exc).split())[:300]})"
    else:
        return None
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{shutil.disk_usage(where).free / 2**30:.2f} GiB free on {where}"
    except OSError:
        free = "free space unknown"
    writable = "writable" if os.access(where, os.W_OK) else "NOT writable"
    hint = {errno.ENOSPC: "free disk space or use another --output_dir",
            errno.EDQUOT: "free quota or use another --output_dir",
            errno.EACCES: "make the folder writable or use another --output_dir",
            errno.EROFS: "the file system is read-only: use another --output_dir"}.get(
        code, "check the disk space and permissions of --output_dir")
    name = f" [{errno.errorcode.get(code, code)}]" if code is not None else ""
    message = (f"saving to {path} failed{name}: {reason} ({free}; {where} is {writable}); {hint}. "
               "An incomplete checkpoint folder is skipped when resuming.")
    return OSError(code, message) if code is not None else OSError(message)
