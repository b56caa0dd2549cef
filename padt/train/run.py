"""The entry point of PaDT supervised fine-tuning, `python -m padt.train [--config file.yaml] [--flag value ...]`.

Parse the arguments (`padt.train.arguments`), build the run (`build_trainer`: model, processor, data from
`padt.train.build`; auxiliary losses from `padt.train.auxiliary`), train, save, merge LoRA (`padt.train.lora`). During
training `PaDTTrainer.compute_loss` -> `padt.train.step` -> `padt.train.criterion` -> `padt.train.losses`.

Launch with torchrun or accelerate for several processes (see `run_scripts/padt_*_sft.sh` and `docs/training.md`):

    torchrun --nproc_per_node 8 -m padt.train --config configs/train/sft_3b.yaml \
        --data_config configs/data/pro.yaml --output_dir outputs/padt_pro_3b

A run whose output directory already holds `checkpoint-*` folders resumes from the newest complete one (a save cut
short, e.g. by a full disk or a kill, is skipped with a warning saying why; `padt.train.checkpoints.checkpoint_problem`);
`--resume_from_checkpoint PATH` picks one (an incomplete one is an error), `--resume_from_checkpoint false` starts over.
A run holds a lock on its output directory (`.padt.lock`: pid and host) until it ends: a second run on the same folder is
refused, a lock left by a dead process on this host is taken over. Arguments: `python -m padt.train --help`; bad ones
end the command with the usage, one error line and exit code 2.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Self

from transformers import set_seed

from padt.train.arguments import PaDTScriptArguments, PaDTTrainingArguments, parse_train_args
from padt.train.checkpoints import checkpoint_problem, complete_checkpoints

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
        complete, skipped = complete_checkpoints(args.output_dir)
        newest = complete[0] if complete else None
        for path, why in skipped.items():
            logger.warning("not resuming from %s: incomplete checkpoint (%s)%s", path, why,
                           f"; resuming from {newest} instead" if newest else "")
        if skipped and newest is None:
            logger.warning("no complete checkpoint in %s: training starts over", args.output_dir)
        return newest
    if not os.path.isdir(text):
        raise ValueError(f"--resume_from_checkpoint {text}: no such checkpoint folder")
    problem = checkpoint_problem(text)
    if problem:
        raise ValueError(f"--resume_from_checkpoint {text}: incomplete checkpoint ({problem}); pick an earlier "
                         "checkpoint-N, or pass --resume_from_checkpoint true to resume from the newest complete one")
    return text


# ============================================================================ output-folder lock
LOCK_NAME = ".padt.lock"


class OutputDirLocked(RuntimeError):
    """Another live training run holds the output folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or a single process): only it takes the lock, so the other ranks never
    wait on it (they cannot deadlock; if rank 0 is refused, the launcher stops them)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


class OutputDirLock:
    """`output_dir/.padt.lock` (created with `O_CREAT | O_EXCL`, holding `pid host`), held from `acquire` to `release`
    (or as a context manager).

    A lock of a live process (or of another host, which cannot be checked) raises `OutputDirLocked` naming its pid
    and host; a lock of a dead process on this host (a killed run) is taken over with a warning. Only the main process
    takes it (`main_process`, default: `RANK` is 0); on the other ranks `acquire` and `release` do nothing, so they
    never wait on it.
    """

    def __init__(self, output_dir: str | os.PathLike, main_process: bool | None = None):
        self.output_dir = str(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_NAME)
        self.main_process = _is_main_process() if main_process is None else main_process
        self.token = f"{os.getpid()} {socket.gethostname()}"
        self.held = False

    def _owner(self) -> tuple[int, str] | None:
        """(pid, host) written in the lock file; None when it is gone; (-1, "?") when unreadable."""
        try:
            with open(self.path, encoding="utf-8") as f:
                pid_text, _, host = f.read().strip().partition(" ")
            return int(pid_text), host
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return -1, "?"  # being written, or garbage: treated as held

    def acquire(self) -> None:
        if not self.main_process or self.held:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile
                pid, host = owner
                if host == socket.gethostname() and pid > 0 and not _pid_alive(pid):
                    logger.warning("taking over the stale lock %s of process %d on %s (no longer running)", self.path,
                                   pid, host)
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                raise OutputDirLocked(
                    f"--output_dir {self.output_dir} is in use by another training run (pid {pid} on host {host}, "
                    f"lock file {self.path}): wait for it to end or use another --output_dir; if that process is "
                    f"gone, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.token + "\n")
            self.held = True
            return
        raise OutputDirLocked(f"could not take the lock {self.path} of --output_dir {self.output_dir}: it keeps "
                              "changing; is another run starting on it?")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self._owner()
        if owner is not None and f"{owner[0]} {owner[1]}" == self.token:
            try:
                os.remove(self.path)
            except OSError as exc:
                logger.warning("could not remove the lock %s: %s", self.path, exc)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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


USAGE = ("usage: python -m padt.train [--config FILE.yaml] --model_name_or_path MODEL (--data_file_paths FILES "
         "--image_folders DIRS | --data_config MIX.yaml) --output_dir DIR [--flag value ...]  (all flags: --help)")


def _usage_error(message: str) -> SystemExit:
    """Print the usage and one error line to stderr; the `SystemExit(2)` to raise."""
    print(USAGE, file=sys.stderr)
    print(f"python -m padt.train: error: {' '.join(str(message).split())}", file=sys.stderr)
    return SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """`python -m padt.train`: bad arguments (and an output folder in use) end with the usage, one error line and exit
    code 2, before the model loads."""
    try:
        script_args, args = parse_train_args(argv)
        script_args.check_complete()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise _usage_error(str(exc)) from None
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if args.should_log else logging.WARNING)
    lock = OutputDirLock(args.output_dir)
    try:
        lock.acquire()
        resume = resolve_resume(args)  # an incomplete explicit checkpoint fails here, before the model loads
    except (OutputDirLocked, ValueError) as exc:
        lock.release()
        raise _usage_error(str(exc)) from None
    from padt.model.loading import CheckpointError

    try:
        _train(script_args, args, resume)
    except CheckpointError as exc:  # a model / processor path that cannot be loaded: one line, no traceback
        raise _usage_error(str(exc)) from None
    finally:
        lock.release()


def _train(script_args: PaDTScriptArguments, args: PaDTTrainingArguments, resume: str | None) -> None:
    from padt.train.lora import lora_scale, merge_lora_checkpoint

    set_seed(args.seed)  # the new PaDT modules of a base model are initialised from it
    trainer = build_trainer(script_args, args)
    dataset = trainer.train_dataset

    ################ training
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
