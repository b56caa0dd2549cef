"""The arguments of a training run: `PaDTTrainingArguments` (HF `TrainingArguments` + PaDT's switches and loss
weights), `PaDTScriptArguments` (model and data paths) and `parse_train_args` (`HfArgumentParser` with an optional
`--config file.yaml`).

`padt.train.run` parses them; `padt.train.build` builds the model and data from them;
`padt.train.trainer.build_criterion` turns the `*_loss_coef` fields into the criterion's `weight_dict` (`loss_<name>`
<- `<name>_loss_coef`, auxiliary losses included, `padt.train.auxiliary`). Defaults are the authors' recipe
(docs/training.md) where they set one: lr 2e-5, bf16 (on GPUs), activation checkpointing, seed 42, data_seed 42,
logging every step, a checkpoint every 100 steps, 5 VRTs per object, robust CE, every decoder loss on with weight 1,
decoder warm-up on prototypes for the first 300 steps. Everything else is a `TrainingArguments` default (AdamW torch,
linear decay, no warm-up, weight decay 0, max_grad_norm 1.0).

    python -m padt.train --config configs/train/tiny_cpu.yaml --max_steps 5      # CLI flags override the YAML
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from padt.model.decoder.attention import ATTN_IMPLEMENTATIONS
from padt.train.auxiliary import check_auxiliary_args, coef_field, loss_key

# the weights of PaDT's own terms; each auxiliary loss adds its `<name>_loss_coef` field (cell_class_loss_coef)
LOSS_COEF_FIELDS = (
    "ce_loss_coef", "bbox_loss_coef", "giou_loss_coef", "score_loss_coef", "dice_loss_coef", "mask_loss_coef",
)  # fmt: skip
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bf16_gpu_available() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@dataclass
class PaDTTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus PaDT's switches (the paper's ablations), loss weights, warm-up, LoRA and freezing."""

    # ------------------------------------------------------------------ VRT targets and losses
    num_vrt: str = field(
        default="5",
        metadata={"help": "VRTs sampled per object as the answer's target: an int (sampled with replacement when an "
                          "object has fewer foreground cells; the authors' 5) or 'all' (every foreground cell)."},
    )
    robust_ce: bool = field(
        default=True,
        metadata={"help": "Robust VRT cross-entropy: at a VRT target, the object's other foreground cells are masked "
                          "out of the softmax (docs/method.md#the-training-step-and-losses). False = plain CE "
                          "(paper ablation)."},
    )
    use_bbox_loss: bool = field(default=True, metadata={"help": "Decoder box losses (L1 + GIoU)."})
    use_score_loss: bool = field(default=True, metadata={"help": "Decoder score loss (MSE against detached GIoU)."})
    use_mask_loss: bool = field(default=True, metadata={"help": "Decoder mask losses (Dice + sigmoid focal)."})
    ce_loss_coef: float = field(default=1.0, metadata={"help": "Weight of loss_ce (robust per-token CE)."})
    bbox_loss_coef: float = field(default=1.0, metadata={"help": "Weight of loss_bbox (L1 on cxcywh)."})
    giou_loss_coef: float = field(default=1.0, metadata={"help": "Weight of loss_giou (1 - GIoU)."})
    score_loss_coef: float = field(default=1.0, metadata={"help": "Weight of loss_score (MSE)."})
    dice_loss_coef: float = field(default=1.0, metadata={"help": "Weight of loss_dice."})
    mask_loss_coef: float = field(default=1.0, metadata={"help": "Weight of loss_mask (sigmoid focal)."})
    decoder_lr_scale: float = field(
        default=1.0,
        metadata={"help": "Learning rate of the decoder (vl_decoder.*) = learning_rate x this (1 = the authors' single "
                          "rate). A decoder trained from scratch next to a pretrained LLM may want a larger one."},
    )
    vision_lr_scale: float = field(
        default=1.0,
        metadata={"help": "Learning rate of the vision tower (visual.*) = learning_rate x this (1 = the authors' single "
                          "rate). Below 1 keeps more of a pretrained tower's features (see padt/shapes/vision_pretrain.py)."},
    )
    cell_class_loss_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the cell-category auxiliary loss loss_cell_class (padt/shapes/cell_class_loss.py; "
                          "not in the authors' code): the merged features of the cells of objects labelled with one of "
                          "--cell_class_names should point at that name's word embedding. For towers trained from "
                          "scratch. 0 = off."},
    )
    cell_class_names: list[str] = field(
        default_factory=list,
        metadata={"help": "Categories of the cell-class loss (object labels, e.g. the OVD kinds: square circle "
                          "triangle); needed when --cell_class_loss_coef > 0."},
    )
    cell_class_match: str = field(
        default="exact",
        metadata={"help": "How an object label names a cell class: 'exact' (the label is the name, e.g. OVD kinds) or "
                          "'phrase' (the label contains exactly one name as whole words, e.g. 'red square' in the "
                          "referring expression 'the red square on the left')."},
    )
    warmup_prototype_steps: int = field(
        default=300,
        metadata={"help": "For the first N optimizer steps the decoder is fed the ground-truth VRT prototypes instead of "
                          "the LLM hidden states (the authors' warm-up was in effect the first 300 steps). 0 = off."},
    )

    # ------------------------------------------------------------------ model preparation
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": f"Attention of the LLM, the ViT and the decoder: one of {ATTN_IMPLEMENTATIONS} "
                          "(flash_attention_2 needs the flash-attn package and a GPU)."},
    )
    use_visual_prototype_projection: bool | None = field(
        default=None,
        metadata={"help": "Prototype projection LN(E) + W2 W1 LN(E) (True) or a copy of E (False, paper ablation). "
                          "Applied when starting from a base Qwen2.5-VL model; a PaDT checkpoint keeps its own setting "
                          "(a conflicting value raises). Unset = True for base models."},
    )
    freeze_vision: bool = field(
        default=False,
        metadata={"help": "Freeze the vision tower (ViT blocks and merger). The authors train it."},
    )
    use_lora: bool = field(
        default=False,
        metadata={"help": "LoRA (peft) on the LLM's linear layers only; the ViT is frozen, vis_norm, vis_proj and "
                          "vl_decoder stay fully trainable and are saved with the adapter (modules_to_save)."},
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Names of the LLM's linear layers that get LoRA adapters (matched inside "
                          "model.language_model.layers only)."},
    )

    # ------------------------------------------------------------------ authors' TrainingArguments defaults
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW)."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. Unset = on when a bf16-capable GPU is present (the authors' recipe), "
                          "off on CPU."},
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Activation (gradient) checkpointing in the LLM and ViT, non-reentrant. Unset = on (the "
                          "authors' default), unless the deprecated --gradient_checkpointing says otherwise.",
                  "nargs": "?", "const": True},
    )
    data_seed: int | None = field(default=42, metadata={"help": "Seed of the data order (and of the VRT picks)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=100, metadata={"help": "Save a checkpoint every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the PaDT collator reads the raw records."}
    )

    def __post_init__(self) -> None:
        self._check_schedule()
        _ = self.vrt_per_object  # validates num_vrt
        if self.bf16 is None:
            self.bf16 = _bf16_gpu_available()
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        # DDP: the decoder runs on the unwrapped model after the wrapped forward, so DDP's search for unused parameters
        # would mark its parameters ready twice; every trainable parameter gets a gradient each step instead
        # (padt.train.step), which is what DDP expects without the search. (The Trainer turns the search on for
        # models without activation checkpointing, e.g. the tiny shapes recipe.)
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        elif self.ddp_find_unused_parameters:
            raise ValueError("ddp_find_unused_parameters=True does not work with PaDT training: the decoder runs "
                             "outside the DDP-wrapped forward, so DDP would mark its parameters ready twice. Leave it "
                             "unset (False): every trainable parameter gets a gradient each step.")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False for PaDT: the collator needs every record field "
                             "(image, conversations, answer_template, objects)")
        for f in fields(self):
            if f.name.endswith("_loss_coef") and getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0, got {getattr(self, f.name)}")
        check_auxiliary_args(self)  # e.g. the cell-class flags (padt.train.auxiliary.AUXILIARY_LOSSES)
        if self.decoder_lr_scale <= 0:
            raise ValueError(f"decoder_lr_scale must be > 0, got {self.decoder_lr_scale}")
        if self.vision_lr_scale <= 0:
            raise ValueError(f"vision_lr_scale must be > 0, got {self.vision_lr_scale}")
        if self.warmup_prototype_steps < 0:
            raise ValueError(f"warmup_prototype_steps must be >= 0, got {self.warmup_prototype_steps}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={self.attn_implementation!r}; expected one of {ATTN_IMPLEMENTATIONS}")
        if self.use_lora and (self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1):
            raise ValueError(f"bad LoRA settings: lora_r={self.lora_r} (>= 1), lora_alpha={self.lora_alpha} (> 0), "
                             f"lora_dropout={self.lora_dropout} (in [0, 1))")
        if self.dataloader_persistent_workers and self.dataloader_num_workers > 0:
            raise ValueError("dataloader_persistent_workers=True keeps the collator of the first epoch in the workers, "
                             "so the per-epoch VRT picks would repeat; leave it False")
        super().__post_init__()

    def _check_schedule(self) -> None:
        """`ValueError` naming the flag for a batch size, accumulation, step count, epoch count or learning rate that
        cannot train (checked before the model loads; `TrainingArguments` would fail late, divide by zero, or silently
        train by epochs)."""
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"--gradient_accumulation_steps must be >= 1 (1 = no accumulation), got "
                             f"{self.gradient_accumulation_steps}")
        if self.per_device_train_batch_size < 1:
            raise ValueError(f"--per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(f"--max_steps must be a positive number of optimizer steps, or -1 to train for "
                             f"--num_train_epochs; got {self.max_steps}")
        if self.num_train_epochs < 0:
            raise ValueError(f"--num_train_epochs must be >= 0 (a float is allowed, e.g. 1.5), got "
                             f"{self.num_train_epochs}")
        if self.learning_rate < 0:
            raise ValueError(f"--learning_rate must be >= 0 (the authors' recipe: 2e-5), got {self.learning_rate}")

    @property
    def vrt_per_object(self) -> int | None:
        """`num_vrt` as an int, or None for 'all' foreground cells."""
        text = str(self.num_vrt).strip().lower()
        if text == "all":
            return None
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"num_vrt must be a positive int or 'all', got {self.num_vrt!r}") from None
        if n < 1:
            raise ValueError(f"num_vrt must be a positive int or 'all', got {self.num_vrt!r}")
        return n

    def loss_weights(self, auxiliary: Sequence[str] = ()) -> dict[str, float]:
        """`{"loss_ce": ce_loss_coef, ...}` for the enabled loss terms, plus `{"loss_<name>": <name>_loss_coef}` for
        each name in `auxiliary` (`PaDTCriterion`'s `weight_dict`)."""
        on = {"ce": True, "bbox": self.use_bbox_loss, "giou": self.use_bbox_loss, "score": self.use_score_loss,
              "dice": self.use_mask_loss, "mask": self.use_mask_loss}
        out = {}
        for name in LOSS_COEF_FIELDS:
            key = name[: -len("_loss_coef")]
            if on[key]:
                out[loss_key(key)] = float(getattr(self, name))
        for name in auxiliary:
            if not hasattr(self, coef_field(name)):
                raise ValueError(f"auxiliary loss {name!r} has no weight argument {coef_field(name)}")
            out[loss_key(name)] = float(getattr(self, coef_field(name)))
        return out


@dataclass
class PaDTScriptArguments:
    """Model and data paths (the authors' `PaDTScriptArguments` + `PaDTModelConfig`)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base Qwen2.5-VL (e.g. Qwen/Qwen2.5-VL-3B-Instruct) or a PaDT checkpoint (local or hub)."},
    )
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Processor directory; defaults to model_name_or_path."}
    )
    data_file_paths: str | None = field(
        default=None,
        metadata={"help": "':'-separated JSONL files in the released format, local paths or hub names like "
                          "PaDT-MLLM/COCO/instances_train2017.json (a file may repeat to oversample it)."},
    )
    image_folders: str | None = field(
        default=None, metadata={"help": "':'-separated image folders, one per data file."}
    )
    data_config: str | None = field(
        default=None,
        metadata={"help": "YAML data mixture (configs/data/*.yaml) instead of data_file_paths/image_folders."},
    )
    min_pixels: int = field(default=3136, metadata={"help": "Image processor min_pixels (the authors' default)."})
    max_pixels: int = field(default=12845056, metadata={"help": "Image processor max_pixels (the authors' default)."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt + completion in tokens; a longer sample raises (cutting a completion would "
                          "corrupt its VRT targets). Unset = no limit."},
    )
    model_dtype: str = field(
        default="auto",
        metadata={"help": "Weight dtype: auto (bf16/fp16 under DeepSpeed, which keeps fp32 master weights; fp32 "
                          "otherwise, with bf16 as autocast), bfloat16, float16 or float32."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})

    def __post_init__(self) -> None:
        if self.data_config is not None and (self.data_file_paths or self.image_folders):
            raise ValueError("give either data_config or data_file_paths/image_folders, not both")
        if self.model_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"model_dtype must be auto, bfloat16, float16 or float32, got {self.model_dtype!r}")
        if self.min_pixels < 1 or self.max_pixels < self.min_pixels:
            raise ValueError(f"need 1 <= min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    def check_complete(self) -> None:
        """`ValueError` naming what is missing for a training run."""
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required")
        if not self.data_config and not self.data_file_paths:
            raise ValueError("give --data_file_paths (with --image_folders) or --data_config")


def _pop_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Remove `--config PATH` / `--config=PATH` from argv."""
    rest, path, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a YAML file path")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return path, rest


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping of argument names to values (`ValueError` for anything else)."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise TypeError(f"--config {path}: expected a mapping of argument names to values, got {type(data).__name__}")
    return data


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (PaDTScriptArguments, PaDTTrainingArguments),
        prog="python -m padt.train",
        description="PaDT supervised fine-tuning. --config FILE.yaml sets any argument below (a mapping of argument "
                    "names to values); flags on the command line override it. Recipes: run_scripts/padt_*_sft.sh, "
                    "docs/training.md.",
    )


def parse_train_args(
    argv: list[str] | None = None,
) -> tuple[PaDTScriptArguments, PaDTTrainingArguments]:
    """Parse `argv` (default `sys.argv[1:]`). `--config file.yaml` sets defaults; flags on the command line win.

    Unknown keys in the YAML or on the command line raise `ValueError` naming them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _pop_config_flag(argv)
    parser = build_parser()
    if config_path is not None:
        values = load_yaml_config(config_path)
        known = {f.name for dc in (PaDTScriptArguments, PaDTTrainingArguments) for f in fields(dc) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--config {config_path}: unknown argument(s) {unknown}")
        parser.set_defaults(**values)
    script_args, training_args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        raise ValueError(f"unknown command-line argument(s): {rest}")
    return script_args, training_args
