"""Building a training run from its arguments: the model, the processor, freezing (and LoRA, `padt.train.lora`), and
the dataset + collator.

Where it sits: `padt.train.run` parses the arguments (`padt.train.arguments`), builds the run here, then hands it to
`PaDTTrainer` (`padt.train.trainer`), whose `compute_loss` calls `padt.train.step`. Kept out of the entry point so that
tests and notebooks can use the pieces.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from padt.train.arguments import PaDTScriptArguments, PaDTTrainingArguments
from padt.train.lora import apply_lora

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
    """The PaDT model of the checkpoint's backbone (`padt.model.backbones`), with the run's dtype and attention.

    A base backbone checkpoint (no `vl_decoder` in its config) starts PaDT training: the PaDT modules are
    initialised, and `args.use_visual_prototype_projection` (default True) is applied to the config. A PaDT
    checkpoint keeps its own setting; asking for the other one raises `ValueError`.
    """
    from padt.model.backbones import padt_classes_for

    path = script_args.model_name_or_path
    common = {"trust_remote_code": script_args.trust_remote_code}
    config_class, model_class = padt_classes_for(path, **common)
    raw, _ = config_class.get_config_dict(path, **common)
    config = config_class.from_pretrained(path, **common)
    wanted = args.use_visual_prototype_projection
    if wanted is not None:
        if "vl_decoder" in raw and bool(raw.get("use_visual_prototype_projection", True)) != wanted:
            raise ValueError(
                f"{path} is a PaDT checkpoint with use_visual_prototype_projection="
                f"{raw.get('use_visual_prototype_projection', True)}; --use_visual_prototype_projection {wanted} "
                "only applies when starting from a base (non-PaDT) checkpoint"
            )
        config.use_visual_prototype_projection = wanted
    config.use_cache = False
    return model_class.from_pretrained(
        path, config=config, dtype=resolve_model_dtype(script_args, args),
        attn_implementation=args.attn_implementation, **common,
    )


def load_padt_processor(script_args: PaDTScriptArguments, vrt_base_id: int):
    """`PaDTProcessor` from `processor_name_or_path` (default: the model's), with the run's pixel limits.

    A hub name (not a local folder) is fetched with `huggingface_hub.snapshot_download`, processor files only; a path
    that looks local but does not exist, or a hub name that is not cached while offline, raises `FileNotFoundError`
    at once (`padt.model.loading.resolve_source`), as does a folder without tokenizer / image processor files.
    """
    from transformers.image_utils import SizeDict

    from padt.model.loading import resolve_source
    from padt.processing.processor import PaDTProcessor

    path = script_args.processor_name_or_path or script_args.model_name_or_path
    local = resolve_source(path)
    if local is not None:
        path = local
    else:
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=list(PROCESSOR_FILE_PATTERNS))
    processor = PaDTProcessor.from_pretrained(path, vrt_base_id=vrt_base_id)
    processor.image_processor.size = SizeDict(shortest_edge=int(script_args.min_pixels),
                                              longest_edge=int(script_args.max_pixels))
    return processor


# ============================================================================ freezing (and LoRA)
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
