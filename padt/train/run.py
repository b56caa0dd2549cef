"""The entry point of PaDT supervised fine-tuning, `python -m padt.train [--config file.yaml] [--flag value ...]`.

Parse the arguments (`padt.train.arguments`), build the run (`build_trainer`: model, processor, data from
`padt.train.build`; auxiliary losses from `padt.train.auxiliary`), train, save, merge LoRA (`padt.train.lora`). During
training `PaDTTrainer.compute_loss` -> `padt.train.step` -> `padt.train.criterion` -> `padt.train.losses`.

Launch with torchrun or accelerate for several processes (see `run_scripts/padt_*_sft.sh` and `docs/training.md`):

    torchrun --nproc_per_node 8 -m padt.train --config configs/train/sft_3b.yaml \
        --data_config configs/data/pro.yaml --output_dir outputs/padt_pro_3b

A run whose output directory already holds `checkpoint-*` folders resumes from the last one (`--resume_from_checkpoint
PATH` picks one, `--resume_from_checkpoint false` starts over). Arguments: `python -m padt.train --help`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from padt.train.arguments import PaDTScriptArguments, PaDTTrainingArguments, parse_train_args

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from padt.train.trainer import PaDTTrainer

logger = logging.getLogger("padt.train.run")

_NO = ("", "false", "no", "none", "0")
_YES = ("true", "yes", "auto", "1")


def resolve_resume(args: PaDTTrainingArguments) -> str | None:
    """Checkpoint to resume from: an explicit path; `true`/unset = the last `checkpoint-*` in `output_dir` if any
    (`true` with none starts fresh, as the authors' `--resume_from_checkpoint true` does); `false` = none."""
    value = args.resume_from_checkpoint
    text = "" if value is None else str(value).strip()
    if text.lower() in _NO and value is not None:
        return None
    if value is None or text.lower() in _YES:
        return get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if not os.path.isdir(text):
        raise ValueError(f"--resume_from_checkpoint {text}: no such checkpoint folder")
    return text


def build_trainer(script_args: PaDTScriptArguments, args: PaDTTrainingArguments,
                  callbacks: list[TrainerCallback] | None = None) -> PaDTTrainer:
    """The `PaDTTrainer` of a run: model, processor, freezing / LoRA and data (`padt.train.build`), and the auxiliary
    losses the arguments switch on (`padt.train.auxiliary.auxiliary_losses_from_args`: e.g. `--cell_class_loss_coef`
    adds the shapes benchmark's cell-class loss)."""
    from padt.train.auxiliary import auxiliary_losses_from_args
    from padt.train.build import build_train_data, load_model, load_padt_processor, prepare_model_for_training
    from padt.train.trainer import PaDTTrainer

    ################ model and processor
    model = load_model(script_args, args)
    processor = load_padt_processor(script_args, model.config.vrt_base_id)
    counts = prepare_model_for_training(model, args)
    logger.info("trainable parameters: %s of %s", f"{counts['trainable']:,}", f"{counts['total']:,}")

    ################ data
    dataset, collator = build_train_data(script_args, args, processor, model.vl_decoder.mask_upscale)
    logger.info("%r", dataset)

    ################ loss and trainer
    return PaDTTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset,
                       processing_class=processor, callbacks=callbacks,
                       auxiliary_losses=auxiliary_losses_from_args(args, processor))


def main(argv: list[str] | None = None) -> None:
    from padt.train.lora import lora_scale, merge_lora_checkpoint

    script_args, args = parse_train_args(argv)
    script_args.check_complete()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if args.should_log else logging.WARNING)
    set_seed(args.seed)  # the new PaDT modules of a base model are initialised from it
    trainer = build_trainer(script_args, args)
    dataset = trainer.train_dataset

    ################ training
    resume = resolve_resume(args)
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    trainer.save_model(args.output_dir)
    if args.use_lora and trainer.is_world_process_zero():
        merged = merge_lora_checkpoint(args.output_dir, lora_scale(args))
        logger.info("merged %d LoRA layers into %s", merged, args.output_dir)
    trainer.accelerator.wait_for_everyone()
    report = dataset.fallback_report()
    if any(r["fallback"] for r in report.values()):
        logger.warning("objects without a foreground cell at the processor grid (box-centre cell used): %s", report)


if __name__ == "__main__":
    main()
