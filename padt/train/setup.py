"""Building blocks of a training run, kept out of the entry point so that tests and notebooks can use them:
load the model and processor, prepare the model (freezing, LoRA), build the dataset + collator, merge LoRA weights
into a saved checkpoint.

LoRA. Adapters are injected into the LLM's linear layers only (`peft.inject_adapter_in_model`, no `PeftModel`
wrapper), so the model stays a `PaDTForConditionalGeneration`: `vis_norm`, `vis_proj` and `vl_decoder` are trained
fully, checkpoints hold the whole state (resume works as without LoRA), and `merge_lora_checkpoint` turns the final
save into a plain PaDT checkpoint (`W + scale * B @ A`) that loads without peft.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from padt.train.arguments import PaDTScriptArguments, PaDTTrainingArguments

logger = logging.getLogger(__name__)

PADT_TRAINABLE_MODULES = ("vis_norm", "vis_proj", "vl_decoder")
PROCESSOR_FILE_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
MODEL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ============================================================================ model and processor
def deepspeed_enabled(args: PaDTTrainingArguments) -> bool:
    """True when the run uses DeepSpeed (`--deepspeed` or an accelerate DeepSpeed launch)."""
    return bool(args.deepspeed) or getattr(args, "deepspeed_plugin", None) is not None


def resolve_model_dtype(script_args: PaDTScriptArguments, args: PaDTTrainingArguments) -> torch.dtype:
    """Weight dtype. `auto`: bf16/fp16 under DeepSpeed with --bf16/--fp16 (DeepSpeed keeps fp32 master weights), fp32
    otherwise (the Trainer then runs bf16 as autocast; torch AdamW on bf16 weights would lose updates smaller than
    bf16's resolution, e.g. at lr 2e-5)."""
    if script_args.model_dtype != "auto":
        return MODEL_DTYPES[script_args.model_dtype]
    if deepspeed_enabled(args):
        if args.bf16:
            return torch.bfloat16
        if args.fp16:
            return torch.float16
    return torch.float32


def load_model(script_args: PaDTScriptArguments, args: PaDTTrainingArguments):
    """`PaDTForConditionalGeneration.from_pretrained` with the run's dtype and attention.

    A base Qwen2.5-VL checkpoint (no `vl_decoder` in its config) starts PaDT training: the PaDT modules are
    initialised, and `args.use_visual_prototype_projection` (default True) is applied to the config. A PaDT
    checkpoint keeps its own setting; asking for the other one raises `ValueError`.
    """
    from padt.model.configuration import PaDTConfig
    from padt.model.modeling import PaDTForConditionalGeneration

    path = script_args.model_name_or_path
    common = {"trust_remote_code": script_args.trust_remote_code}
    raw, _ = PaDTConfig.get_config_dict(path, **common)
    config = PaDTConfig.from_pretrained(path, **common)
    wanted = args.use_visual_prototype_projection
    if wanted is not None:
        if "vl_decoder" in raw and bool(raw.get("use_visual_prototype_projection", True)) != wanted:
            raise ValueError(
                f"{path} is a PaDT checkpoint with use_visual_prototype_projection="
                f"{raw.get('use_visual_prototype_projection', True)}; --use_visual_prototype_projection {wanted} "
                "only applies when starting from a base Qwen2.5-VL model"
            )
        config.use_visual_prototype_projection = wanted
    config.use_cache = False
    return PaDTForConditionalGeneration.from_pretrained(
        path, config=config, dtype=resolve_model_dtype(script_args, args),
        attn_implementation=args.attn_implementation, **common,
    )


def load_padt_processor(script_args: PaDTScriptArguments, vrt_base_id: int):
    """`PaDTProcessor` from `processor_name_or_path` (default: the model's), with the run's pixel limits.

    A hub name (not a local folder) is fetched with `huggingface_hub.snapshot_download`, processor files only.
    """
    from transformers.image_utils import SizeDict

    from padt.processing.processor import PaDTProcessor

    path = script_args.processor_name_or_path or script_args.model_name_or_path
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=list(PROCESSOR_FILE_PATTERNS))
    processor = PaDTProcessor.from_pretrained(path, vrt_base_id=vrt_base_id)
    processor.image_processor.size = SizeDict(shortest_edge=int(script_args.min_pixels),
                                              longest_edge=int(script_args.max_pixels))
    return processor


# ============================================================================ freezing and LoRA
def lora_target_pattern(names: list[str]) -> str:
    """Regex (full match on module names) selecting the given linear layers inside the LLM's decoder layers only."""
    if not names:
        raise ValueError("lora_target_modules is empty")
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"(?:.*\.)?language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{alternatives})"


def lora_scale(args: PaDTTrainingArguments) -> float:
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
    for name in PADT_TRAINABLE_MODULES:
        module = getattr(model, name, None)
        if module is not None:
            module.requires_grad_(True)
    return adapted


def register_zero3_external_parameters(model: nn.Module) -> int:
    """Under DeepSpeed ZeRO-3, register the decoder's embedding tables as external parameters of the decoder.

    ZeRO-3 gathers a module's partitioned parameters when that module's `forward` runs; the decoder reads its
    `nn.Embedding` tables (`vp_embedding`, `bbox_score_mask_tokens`) as `.weight` without calling them, so they must
    be gathered with the decoder itself. Returns the number registered (0 without ZeRO-3).
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return 0
    import deepspeed

    decoder, count = model.vl_decoder, 0
    for module in decoder.modules():
        if isinstance(module, nn.Embedding):
            deepspeed.zero.register_external_parameter(decoder, module.weight)
            count += 1
    return count


def prepare_model_for_training(model: nn.Module, args: PaDTTrainingArguments) -> dict[str, int]:
    """Apply LoRA / freezing from the arguments; returns trainable and total parameter counts.

    * `use_lora`: adapters on the LLM (see `apply_lora`); the ViT is frozen with it.
    * `freeze_vision`: the vision tower (blocks and merger) gets no gradient.
    * no decoder loss at all: the decoder is frozen (it is never run, and DDP needs a gradient for every trainable
      parameter). A single switched-off head stays trainable: the loss links it with weight 0.
    * ZeRO-3: `register_zero3_external_parameters`.
    """
    model.config.use_cache = False
    register_zero3_external_parameters(model)
    if args.use_lora:
        apply_lora(model, args)
    if args.freeze_vision or args.use_lora:
        model.model.visual.requires_grad_(False)
    if not (args.use_bbox_loss or args.use_score_loss or args.use_mask_loss):
        model.vl_decoder.requires_grad_(False)
    params = list(model.parameters())
    def count(p: torch.Tensor) -> int:  # ZeRO-3 partitions parameters: their full size is ds_numel
        return int(getattr(p, "ds_numel", p.numel()))

    return {"trainable": sum(count(p) for p in params if p.requires_grad), "total": sum(count(p) for p in params)}


# ============================================================================ data
def build_train_data(script_args: PaDTScriptArguments, args: PaDTTrainingArguments, processor: Any,
                     mask_upscale: int):
    """(`PaDTDataset`, `PaDTCollator`) for the run: the sources of `data_config` or `data_file_paths` +
    `image_folders`; cells at the processor's grid; VRT picks seeded by `data_seed` (else `seed`)."""
    from padt.data import PaDTCollator, PaDTDataset

    if script_args.data_config:
        dataset = PaDTDataset(script_args.data_config, processor)
    else:
        dataset = PaDTDataset(script_args.data_file_paths, processor, image_folders=script_args.image_folders)
    n = args.vrt_per_object
    collator = PaDTCollator(
        processor,
        num_vrt="all" if n is None else n,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        robust=args.robust_ce,
        max_length=script_args.max_length,
        mask_upscale=mask_upscale,
    )
    return dataset, collator


# ============================================================================ LoRA merge of a saved checkpoint
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
    from safetensors.torch import load_file

    folder = Path(checkpoint_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {folder}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    merged_layers = sum(1 for k in state if ".lora_A." in k)
    if merged_layers == 0:
        return 0
    merged = merge_lora_state_dict(state, scale)
    for name in files:
        (folder / name).unlink()
    index.unlink(missing_ok=True)
    save_torch_state_dict(merged, str(folder), metadata={"format": "pt"})
    return merged_layers
