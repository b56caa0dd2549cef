"""LoRA for PaDT training: adapters on the LLM's linear layers (`apply_lora`, called by
`padt.train.build.prepare_model_for_training`), and merging them into a saved checkpoint (`merge_lora_checkpoint`,
called by `padt.train.run` after training).

Adapters are injected into the LLM's linear layers only (`peft.inject_adapter_in_model`, no `PeftModel` wrapper), so
the model stays a `PaDTForConditionalGeneration`: `vis_norm`, `vis_proj` and `vl_decoder` are trained fully,
checkpoints hold the whole state (resume works as without LoRA), and `merge_lora_checkpoint` turns the final save into
a plain PaDT checkpoint (`W + scale * B @ A`) that loads without peft.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from padt.model.modeling import PADT_MODULE_NAMES
from padt.train.arguments import PaDTTrainingArguments
from padt.train.checkpoints import INDEX_FILE, load_saved_state_dict, weight_files

__all__ = ["apply_lora", "lora_scale", "lora_target_pattern", "merge_lora_checkpoint", "merge_lora_state_dict"]



# ============================================================================ adapters
def lora_target_pattern(names: list[str]) -> str:
    """Regex (full match on module names) selecting the given linear layers inside the LLM's decoder layers only."""
    if not names:
        raise ValueError("lora_target_modules is empty")
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"(?:.*\.)?language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{alternatives})"


def lora_scale(args: PaDTTrainingArguments) -> float:
    """The adapters' scale `lora_alpha / lora_r` (what `merge_lora_checkpoint` multiplies `B @ A` by)."""
    return float(args.lora_alpha) / float(args.lora_r)


def apply_lora(model: nn.Module, args: PaDTTrainingArguments) -> int:
    """Inject LoRA adapters into the LLM's linear layers, in place; returns the number of adapted layers.

    Afterwards only the adapters and the PaDT modules (`vis_norm`, `vis_proj`, `vl_decoder`) require gradients.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                        target_modules=lora_target_pattern(list(args.lora_target_modules)))
    inject_adapter_in_model(config, model)
    adapted = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    if adapted == 0:
        raise ValueError(f"no LLM layer matched lora_target_modules={args.lora_target_modules}")
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
    for name in PADT_MODULE_NAMES:  # trained fully next to the adapters
        module = getattr(model, name, None)
        if module is not None:
            module.requires_grad_(True)
    return adapted


# ============================================================================ merging into a saved checkpoint
def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scale: float,
                          adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Fold LoRA adapters into their base weights: `X.weight = X.base_layer.weight + scale * B @ A` (in fp32, cast
    back), `X.base_layer.bias -> X.bias`; adapter keys are dropped. Keys without adapters are kept as they are."""
    out: dict[str, torch.Tensor] = {}
    suffix_a, suffix_b = f".lora_A.{adapter_name}.weight", f".lora_B.{adapter_name}.weight"
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key or ".lora_dropout." in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        prefix, leaf = key.split(".base_layer.", 1)
        if leaf == "weight":
            a, b = state_dict.get(prefix + suffix_a), state_dict.get(prefix + suffix_b)
            if a is None or b is None:
                raise ValueError(f"{key} has no {adapter_name!r} LoRA pair ({prefix}{suffix_a}, {prefix}{suffix_b})")
            value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        out[f"{prefix}.{leaf}"] = value
    return out


def merge_lora_checkpoint(checkpoint_dir: str | os.PathLike, scale: float) -> int:
    """Rewrite the safetensors weights of a saved model folder with its LoRA adapters merged (see
    `merge_lora_state_dict`); returns the number of merged layers (0: nothing to do)."""
    from huggingface_hub import save_torch_state_dict

    folder = Path(checkpoint_dir)
    files = weight_files(folder)
    state = load_saved_state_dict(folder)
    if files is None or state is None:
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {folder}")
    merged_layers = sum(1 for k in state if ".lora_A." in k)
    if merged_layers == 0:
        return 0
    merged = merge_lora_state_dict(state, scale)
    for name in files:
        (folder / name).unlink()
    (folder / INDEX_FILE).unlink(missing_ok=True)
    save_torch_state_dict(merged, str(folder), metadata={"format": "pt"})
    return merged_layers
