"""`PaDTTrainer`: the HF `Trainer` with PaDT's loss and per-term logging, and `build_criterion` (arguments -> loss).

Where it sits: `padt.train.run` -> `padt.train.build` (model, processor, data) -> `PaDTTrainer.compute_loss` (here) ->
`padt.train.step.compute_padt_loss` (one batch) -> `padt.train.criterion.PaDTCriterion` -> `padt.train.losses`.
What it overrides, and nothing else (no Trainer internals are copied):

* `compute_loss`: one call of `compute_padt_loss` with the trainer's criterion (auxiliary losses included); the decoder
  is fed the ground-truth VRT prototypes while `state.global_step < args.warmup_prototype_steps` (the authors' warm-up
  in their `compute_loss`, `src/PaDT/trainer/padt_sft_trainer.py`; docs/method.md#the-training-step-and-losses);
* `prediction_step`: the same loss under `no_grad` for evaluation (the model's own forward takes no PaDT targets);
* `_load_from_checkpoint`: weights of a resumed run (see **Resume**);
* `_save_checkpoint` / `save_model`: a failed write (disk full, folder not writable; torch.save says only
  `basic_ios::clear`) raises an `OSError` naming the path, the errno and the free space (`padt.train.checkpoints.save_error`);
* `log`: TRL-style side metrics. Every micro-batch appends each term (`loss_ce`, `loss_bbox`, `loss_giou`,
  `loss_score`, `loss_dice`, `loss_mask`, `iou`, `giou`, auxiliary losses and their metrics, the authors'
  `sft_loss`/`bbox_loss`/`score_loss`/`mask_loss`) and batch facts (`objects_per_sample`, `batches_without_objects`) to `self._metrics`; `log` averages
  them over the window and over all ranks (one `all_gather_object` per log call, on every rank, as HF's own loss
  logging does) and adds the throughput of the window, `samples_per_second` and `tokens_per_second` (all ranks).

**Gradient accumulation.** `Qwen2_5_VLForConditionalGeneration.accepts_loss_kwargs` is False, and our loss does not
use `num_items_in_batch` anyway: every micro-batch loss is a mean (per-sample CE means averaged over the batch;
decoder terms divided by the all-reduced object count of that micro-batch). `loss_is_scaled_for_ga = False` tells the
Trainer to divide it by the number of accumulation steps, so the accumulated gradient is the mean of the micro-batch
means: with equal micro-batches that is exactly the authors' per-sample-mean CE over the accumulated batch, and the
decoder terms are box-weighted per micro-batch (not over the whole accumulated batch).

**Resume.** transformers saves Qwen2.5-VL weights under their original (transformers-4.50) names (`model.layers.*`,
`visual.*`), but the Trainer's resume loads them with a plain `load_state_dict`, which matches none of the LLM and ViT
weights (only a warning; transformers 5.23 has this bug for vanilla Qwen2.5-VL too). `_load_from_checkpoint` is
therefore overridden: it renames the saved keys with the class's registered checkpoint conversion (the same renaming
`from_pretrained` applies) and loads strictly, raising on any missing or unexpected key (`padt.train.checkpoints`).
DeepSpeed resumes through its own engine checkpoint and is not affected.

**Epochs and VRT picks.** A `TrainerCallback` calls `PaDTCollator.set_epoch` at every epoch start (before the
DataLoader iterator, hence its worker processes, is created). Picks depend only on (seed, epoch, dataset index) and
the data order on (data_seed, epoch) (accelerate's seedable sampler), so a run resumed from a checkpoint sees the same
batches with the same VRTs as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from padt.train.arguments import PaDTTrainingArguments
from padt.train.auxiliary import AuxiliaryLoss, check_auxiliary_wiring
from padt.train.checkpoints import load_saved_state_dict, load_state_dict_strict, save_error
from padt.train.criterion import PaDTCriterion

# compute_padt_loss also returns these; the Trainer logs its own `loss`, and `objects_per_sample` replaces the count.
_SKIPPED_LOG_KEYS = ("loss", "num_objects")


def build_criterion(args: PaDTTrainingArguments, auxiliary_losses: Sequence[AuxiliaryLoss] = ()) -> PaDTCriterion:
    """The loss of a run: enabled terms, their weights (`loss_<name>` <- `args.<name>_loss_coef`, auxiliary losses
    included) and the robust-CE switch, from the training arguments."""
    return PaDTCriterion(
        args.loss_weights([aux.name for aux in auxiliary_losses]),
        use_bbox_loss=args.use_bbox_loss,
        use_score_loss=args.use_score_loss,
        use_mask_loss=args.use_mask_loss,
        robust=args.robust_ce,
        auxiliary_losses=auxiliary_losses,
    )


def epoch_of(state: Any) -> int:
    """The integer epoch a `TrainerState` is in. `state.epoch` is `epoch + (step + 1) / steps_in_epoch`, computed
    afresh each step (exactly an integer at an epoch's end) and restored from a checkpoint when resuming."""
    return math.floor(state.epoch or 0.0)


class CollatorEpochCallback(TrainerCallback):
    """Tells the collator which epoch starts, so its VRT picks follow (seed, epoch, index)."""

    def __init__(self, collator: Any):
        if not callable(getattr(collator, "set_epoch", None)):
            raise TypeError(f"{type(collator).__name__} has no set_epoch(epoch)")
        self.collator = collator

    def on_train_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(epoch_of(state))

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(epoch_of(state))


def _scalar(value: Any) -> float | None:
    """A float from a Python number or a one-element tensor; None for anything else."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class PaDTTrainer(Trainer):
    """HF `Trainer` for PaDT SFT.

    Args:
        model: a `PaDTForConditionalGeneration` (optionally with LoRA layers injected, see `padt.train.lora`).
        args (`PaDTTrainingArguments`).
        data_collator: a `padt.data.PaDTCollator` (its `set_epoch` is called every epoch).
        criterion (`PaDTCriterion`, *optional*): default `build_criterion(args, auxiliary_losses)`.
        auxiliary_losses (`Sequence[AuxiliaryLoss]`, *optional*): extra loss terms (`padt.train.auxiliary`), weighed
            by `args.<name>_loss_coef`; those the arguments switch on are built by
            `padt.train.auxiliary.auxiliary_losses_from_args` (`padt.train.run.build_trainer` does). Give them either
            here or inside `criterion`.
        Other keyword arguments go to `Trainer` (`train_dataset`, `eval_dataset`, `processing_class`, `callbacks`...).
    """

    loss_is_scaled_for_ga = False  # per-micro-batch means: the Trainer divides by the accumulation steps

    def __init__(self, model: nn.Module, args: PaDTTrainingArguments, data_collator: Any,
                 criterion: PaDTCriterion | None = None, auxiliary_losses: Sequence[AuxiliaryLoss] = (),
                 **kwargs: Any):
        if not isinstance(args, PaDTTrainingArguments):
            raise TypeError(f"args must be PaDTTrainingArguments, got {type(args).__name__}")
        if data_collator is None:
            raise ValueError("PaDTTrainer needs the PaDT collator (data_collator=PaDTCollator(...))")
        if criterion is not None and auxiliary_losses:
            raise ValueError("give the auxiliary losses to the criterion (PaDTCriterion(auxiliary_losses=...)) when "
                             "passing one, not to PaDTTrainer")
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        self.criterion = criterion if criterion is not None else build_criterion(args, auxiliary_losses)
        check_auxiliary_wiring(args, self.criterion.loss_keys)
        self._metrics: dict[str, defaultdict[str, list[float]]] = {"train": defaultdict(list),
                                                                   "eval": defaultdict(list)}
        self._window = {"train": self._new_window(), "eval": self._new_window()}
        if callable(getattr(data_collator, "set_epoch", None)):
            self.add_callback(CollatorEpochCallback(data_collator))

    @staticmethod
    def _new_window() -> dict[str, float]:
        return {"start": time.perf_counter(), "samples": 0.0, "tokens": 0.0}

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with per-module learning rates: with `decoder_lr_scale != 1` (or
        `vision_lr_scale != 1`) each of its parameter groups is split, the decoder's parameters (`vl_decoder.*`; the
        vision tower's, `visual.*`) getting `lr x` that scale (the schedule scales all groups alike)."""
        optimizer = super().create_optimizer(model)
        if getattr(self, "_lr_groups_split", False):
            return optimizer
        target = self.model if model is None else model
        for module, scale in (("vl_decoder", self.args.decoder_lr_scale), ("visual", self.args.vision_lr_scale)):
            if scale == 1.0:
                continue
            chosen = {id(p) for n, p in target.named_parameters() if module in n.split(".")}
            if not chosen:
                raise ValueError(f"a learning-rate scale is set for {module} but the model has no {module} parameters")
            for group in list(optimizer.param_groups):
                mine = [p for p in group["params"] if id(p) in chosen]
                if not mine:
                    continue
                group["params"] = [p for p in group["params"] if id(p) not in chosen]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                                           "lr": group["lr"] * scale})
        self._lr_groups_split = True
        return optimizer

    # ------------------------------------------------------------------ loss
    def use_prototype_features(self) -> bool:
        """True during the decoder warm-up: the first `warmup_prototype_steps` optimizer steps."""
        return self.state.global_step < self.args.warmup_prototype_steps

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        from padt.train.step import compute_padt_loss

        loss, logs = compute_padt_loss(model, inputs, criterion=self.criterion,
                                       use_prototype_features=self.use_prototype_features())
        self._record("train" if model.training else "eval", logs, inputs)
        return (loss, logs) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation: the PaDT loss only (no logits or labels are gathered)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ resume
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load a checkpoint's weights for resuming, mapping saved key names to the model's (see module doc)."""
        state = load_saved_state_dict(resume_from_checkpoint)
        if state is None or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_state_dict_strict(model if model is not None else self.model, state, resume_from_checkpoint)

    # ------------------------------------------------------------------ saving
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint save, with a failed write reported as an `OSError` naming the checkpoint folder."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = f"{self._get_output_dir(trial=trial)}/{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as exc:
            error = save_error(exc, folder)
            if error is None:
                raise
            raise error from exc

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's `save_model`, with a failed write reported as an `OSError` naming `output_dir`."""
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        except (OSError, RuntimeError) as exc:
            error = save_error(exc, output_dir if output_dir is not None else self.args.output_dir)
            if error is None or _internal_call:  # inside _save_checkpoint: reported there, with the folder
                raise
            raise error from exc

    # ------------------------------------------------------------------ metrics
    def _record(self, mode: str, logs: Mapping[str, Any], inputs: Mapping[str, Any]) -> None:
        metrics = self._metrics[mode]
        if mode == "eval" and not metrics:  # eval windows start at their first batch
            self._window[mode] = self._new_window()
        for key, value in logs.items():
            if key in _SKIPPED_LOG_KEYS:
                continue
            v = _scalar(value)
            if v is not None:
                metrics[key].append(v)
        batch = int(inputs["input_ids"].shape[0])
        num_objects = int(inputs.get("num_objects", 0))
        metrics["objects_per_sample"].append(num_objects / max(batch, 1))
        metrics["batches_without_objects"].append(float(num_objects == 0))
        window = self._window[mode]
        window["samples"] += batch
        window["tokens"] += float(inputs.get("num_tokens", int(inputs["attention_mask"].sum())))

    def _gather_metrics(self, mode: str) -> tuple[dict[str, float], float, float]:
        """(averages over the window and all ranks, global samples, global tokens)."""
        local = {k: (sum(v), len(v)) for k, v in self._metrics[mode].items() if v}
        window = self._window[mode]
        payload = (local, window["samples"], window["tokens"])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, payload)
        else:
            gathered = [payload]
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for metrics, _, _ in gathered:
            for key, (total, count) in metrics.items():
                sums[key][0] += total
                sums[key][1] += count
        averages = {key: total / count for key, (total, count) in sums.items() if count}
        return averages, sum(g[1] for g in gathered), sum(g[2] for g in gathered)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        averages, samples, tokens = self._gather_metrics(mode)
        prefix = "eval_" if mode == "eval" else ""
        if averages:
            elapsed = max(time.perf_counter() - self._window[mode]["start"], 1e-9)
            logs = {**logs, **{prefix + k: v for k, v in averages.items()}}
            logs[prefix + "samples_per_second"] = samples / elapsed
            logs[prefix + "tokens_per_second"] = tokens / elapsed
        self._metrics[mode].clear()
        self._window[mode] = self._new_window()
        super().log(logs, start_time)
