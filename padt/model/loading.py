"""Checks run before a model or processor is loaded from a path, so that a bad path fails at once and names the fix.

transformers, given a folder without `config.json`, a missing relative path or a half-written `model.safetensors`,
builds a default config (and allocates it), retries the hub for a minute, or reports a safetensors error that names no
file; and it loads a checkpoint that lacks backbone weights by initialising them. The functions here turn each into a
`FileNotFoundError` / `ValueError` (both `CheckpointError`s, which `python -m padt.train` prints as one line).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from typing import Any

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
HUB_KWARGS = ("cache_dir", "revision", "local_files_only", "token", "subfolder")


class CheckpointError(ValueError):
    """A model or processor path that cannot be loaded (bad folder, missing or broken files, unsupported backbone)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A model or processor path, or a file it needs, that does not exist."""


def hub_offline(local_files_only: bool = False) -> bool:
    """True when the hub must not be contacted (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` set, or
    `local_files_only`)."""
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(local_files_only) or any(f not in ("", "0", "false", "no", "off") for f in flags)


def looks_local(path: str) -> bool:
    """True for a string meant as a local path, not a hub id (`org/name`): it exists, starts with `.`, `/` or `~`,
    or holds more than one path separator."""
    return (os.path.exists(path) or path.startswith((".", "/", "~")) or path.count(os.sep) > 1
            or (os.altsep is not None and path.count(os.altsep) > 1))


def resolve_source(path: str | os.PathLike, **hub_kwargs: Any) -> str | None:
    """The local folder for a model/processor `path` (with `subfolder`), or None for a hub id that may be fetched.

    Raises `CheckpointNotFoundError` at once for a path that looks local (see `looks_local`) but is not a folder, and
    for a hub id that is not in the local cache while the hub is offline.
    """
    text = os.path.expanduser(os.fspath(path))
    sub = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(text):
        folder = os.path.join(text, sub) if sub else text
        if not os.path.isdir(folder):
            raise CheckpointNotFoundError(f"{folder}: no such folder (subfolder={sub!r} of {text})")
        return folder
    if os.path.exists(text):
        raise CheckpointNotFoundError(f"{text} is a file; pass the checkpoint folder that holds it")
    offline = hub_offline(hub_kwargs.get("local_files_only", False))
    if looks_local(text) or text.count("/") > 1:
        raise CheckpointNotFoundError(f"{text}: no such folder (pass an existing checkpoint folder or a hub id)")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(text, CONFIG_FILE, cache_dir=hub_kwargs.get("cache_dir"),
                                            revision=hub_kwargs.get("revision"))
        except ValueError:  # not a valid repo id either
            cached = None
        if not isinstance(cached, str):
            raise CheckpointNotFoundError(
                f"{text}: no such folder, and as a hub id it cannot be reached offline (HF_HUB_OFFLINE or "
                "local_files_only is set and it is not in the hub cache): download it first or pass a local folder"
            )
    return None


def _first(folder: str, names: Iterable[str]) -> str | None:
    return next((n for n in names if os.path.isfile(os.path.join(folder, n))), None)


def check_config_file(folder: str) -> None:
    """`CheckpointNotFoundError` unless `folder` holds `config.json`."""
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise CheckpointNotFoundError(
            f"{folder} has no {CONFIG_FILE}: a model folder needs the config.json saved with its weights "
            "(save_pretrained writes both)"
        )


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a safetensors file is unusable (missing, header unreadable, shorter or longer than its header says), or
    None. Reads only the header: no tensor is loaded."""
    name = os.path.basename(os.fspath(path))
    if not os.path.isfile(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return f"{name} is truncated ({size} bytes, header of {header_len})"
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError) as exc:
        return f"{name} has an unreadable header ({exc})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + end:
        return f"{name} is truncated ({size} bytes, expected {8 + header_len + end})"
    return None


def check_safetensors_file(file: str) -> None:
    """`CheckpointError` naming `file` when its header cannot be read or its data is cut short (a partial copy)."""
    problem = safetensors_problem(file)
    if problem:
        raise CheckpointError(f"{file} is truncated or corrupt ({problem}); copy or download it again") from None


def check_model_folder(folder: str) -> None:
    """`config.json` and the weights of a local model folder exist, and every safetensors file is complete."""
    check_config_file(folder)
    found = _first(folder, WEIGHT_FILES)
    if found is None:
        raise CheckpointNotFoundError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    files = [found]
    if found == "model.safetensors.index.json":
        try:
            with open(os.path.join(folder, found), encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{os.path.join(folder, found)} is not a valid shard index ({err})") from None
    for name in files:
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise CheckpointNotFoundError(f"{file} is missing (listed in {found})")
        if name.endswith(".safetensors"):
            check_safetensors_file(file)


def check_processor_folder(folder: str) -> None:
    """A processor folder holds tokenizer files and an image processor config; else `CheckpointNotFoundError`
    naming what is missing."""
    if _first(folder, TOKENIZER_FILES) is None:
        raise CheckpointNotFoundError(
            f"{folder} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}): pass the processor "
            "folder (processor_name_or_path) or save the processor next to the model"
        )
    if _first(folder, IMAGE_PROCESSOR_FILES) is None:
        raise CheckpointNotFoundError(
            f"{folder} has no image processor config (expected one of {', '.join(IMAGE_PROCESSOR_FILES)})"
        )


def missing_backbone_weights(missing_keys: Iterable[str], config: Any, padt_modules: Iterable[str]) -> list[str]:
    """The missing keys that are backbone (LLM / vision tower) weights: not PaDT modules, and not `lm_head.weight`
    when the embeddings are tied."""
    padt_modules = tuple(padt_modules)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False))
    return sorted(k for k in missing_keys
                  if k.split(".")[0] not in padt_modules and not (tied and k == "lm_head.weight"))


def check_loaded_weights(
    name_or_path: Any,
    model: Any,
    missing_keys: Iterable[str],
    padt_modules: Iterable[str],
    *,
    allow_missing_weights: bool = False,
    allow_missing_padt_weights: bool | None = None,
    config_kwargs: dict[str, Any] | None = None,
) -> None:
    """`CheckpointError` / `ValueError` for weights a loaded checkpoint lacked (`missing_keys` of transformers'
    loading info).

    Backbone (LLM, vision tower) weights are never legitimately missing (tied `lm_head.weight` aside): refused unless
    `allow_missing_weights`. PaDT's own modules (`padt_modules`) are missing from a base backbone checkpoint (no
    `vl_decoder` in its config.json: PaDT training starts from it) but not from a PaDT checkpoint: refused there unless
    `allow_missing_padt_weights=True`.
    """
    missing_keys = list(missing_keys)
    padt_modules = tuple(padt_modules)
    backbone = missing_backbone_weights(missing_keys, model.config, padt_modules)
    if backbone and not allow_missing_weights:
        raise CheckpointError(
            f"{name_or_path} lacks {len(backbone)} backbone weights: "
            f"{', '.join(backbone[:6])}{' ...' if len(backbone) > 6 else ''}; they would be freshly initialised "
            "and the model would answer differently. Pass allow_missing_weights=True to initialise them anyway."
        )
    missing = sorted(k for k in missing_keys if k.split(".")[0] in padt_modules)
    if missing and allow_missing_padt_weights is None:
        raw, _ = type(model).config_class.get_config_dict(name_or_path, **(config_kwargs or {}))
        allow_missing_padt_weights = "vl_decoder" not in raw
    if missing and not allow_missing_padt_weights:
        raise ValueError(
            f"{name_or_path} is a PaDT checkpoint (its config has vl_decoder) but lacks "
            f"{len(missing)} PaDT weights: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}. "
            "Pass allow_missing_padt_weights=True to initialise them instead."
        )
