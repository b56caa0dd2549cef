"""Training never loses work and refuses bad arguments up front: resume skips an incomplete (interrupted) checkpoint,
a failed save names the path and the errno, bad schedule flags fail before the model loads, `python -m padt.train`
without arguments prints the usage, and one output folder takes one run at a time (`.padt.lock`)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from padt.train.arguments import parse_train_args
from padt.train.checkpoints import checkpoint_problem
from padt.train.run import LOCK_NAME, OutputDirLock, OutputDirLocked, main, resolve_resume
from tests.test_trainer import build, train_args, workspace  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*argv: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "padt.train", *argv], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False, cwd=ROOT)


# ============================================================================ resume: newest complete checkpoint
@pytest.fixture(scope="module")
def two_checkpoints(workspace, tmp_path_factory) -> Path:  # noqa: F811
    """A real tiny run of 2 steps saving every step: checkpoint-1 and checkpoint-2."""
    out = tmp_path_factory.mktemp("run2")
    build(workspace, train_args(out, max_steps=2, save_strategy="steps", save_steps=1)).train()
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    return out


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


DAMAGES = {
    "trainer_state_missing": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "trainer_state_truncated": (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json does not parse"),
    "weights_truncated": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is truncated"),
    "weights_missing": (lambda c: (c / "model.safetensors").unlink(), "no weights"),
    "optimizer_truncated": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
}


@pytest.fixture
def damaged(two_checkpoints, tmp_path, request) -> tuple[Path, str]:
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    damage, why = DAMAGES[request.param]
    damage(out / "checkpoint-2")
    return out, why


@pytest.mark.parametrize("damaged", list(DAMAGES), indirect=True)
def test_auto_resume_skips_an_incomplete_newest_checkpoint(damaged, tmp_path, caplog):
    out, why = damaged
    assert checkpoint_problem(out / "checkpoint-1") is None
    assert why in checkpoint_problem(out / "checkpoint-2")
    with caplog.at_level(logging.WARNING, logger="padt.train.run"):
        chosen = resolve_resume(train_args(out))
    assert chosen == str(out / "checkpoint-1")
    text = caplog.text
    assert "checkpoint-2" in text and why in text and "resuming from" in text and "checkpoint-1" in text


@pytest.mark.parametrize("damaged", ["weights_truncated", "trainer_state_missing"], indirect=True)
def test_explicit_resume_from_an_incomplete_checkpoint_names_what_is_missing(damaged):
    out, why = damaged
    with pytest.raises(ValueError, match=rf"--resume_from_checkpoint .*checkpoint-2: incomplete checkpoint \({why}"):
        resolve_resume(train_args(out, resume_from_checkpoint=str(out / "checkpoint-2")))
    assert resolve_resume(train_args(out, resume_from_checkpoint=str(out / "checkpoint-1"))) == str(
        out / "checkpoint-1")


def test_complete_checkpoints_are_resumed_and_training_continues(two_checkpoints, workspace, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    assert resolve_resume(train_args(out)) == str(out / "checkpoint-2")  # both complete: the newest
    _truncate(out / "checkpoint-2" / "model.safetensors", keep=100)
    args = train_args(out, max_steps=2, save_strategy="steps", save_steps=1)
    resume = resolve_resume(args)
    assert resume == str(out / "checkpoint-1")
    trainer = build(workspace, args)
    trainer.train(resume_from_checkpoint=resume)  # crashed on the truncated checkpoint-2 before
    assert trainer.state.global_step == 2 and checkpoint_problem(out / "checkpoint-2") is None


def test_no_complete_checkpoint_starts_over(two_checkpoints, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    for name in ("checkpoint-1", "checkpoint-2"):
        (out / name / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="padt.train.run"):
        assert resolve_resume(train_args(out)) is None
    assert "training starts over" in caplog.text


# ============================================================================ save errors name the path and errno
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0"
                                                "\nbasic_ios::clear: iostream error")], ids=["ENOSPC", "basic_ios"])
def test_a_failed_checkpoint_save_names_the_folder_and_the_error(workspace, tmp_path, monkeypatch, error):  # noqa: F811
    trainer = build(workspace, train_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1))

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "save", fail)  # the optimizer / rng / training-args writes
    with pytest.raises(OSError, match=r"saving to .*checkpoint-1 failed") as info:
        trainer.train()
    message = str(info.value)
    assert "GiB free on" in message and "--output_dir" in message
    if isinstance(error, OSError):
        assert info.value.errno == errno.ENOSPC and "ENOSPC" in message and "No space left" in message
    else:
        assert "basic_ios" in message
    assert info.value.__cause__ is error
    assert checkpoint_problem(tmp_path / "checkpoint-1")  # the partial folder is not a resume candidate


def test_a_failed_final_save_names_the_folder(workspace, tmp_path, monkeypatch):  # noqa: F811
    trainer = build(workspace, train_args(tmp_path))

    def fail(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match=rf"saving to {tmp_path / 'final'} failed \[EACCES\].*writable") as info:
        trainer.save_model(str(tmp_path / "final"))
    assert info.value.errno == errno.EACCES


def test_other_errors_of_a_save_are_not_rewritten(workspace, tmp_path, monkeypatch):  # noqa: F811
    trainer = build(workspace, train_args(tmp_path))

    def fail(*args, **kwargs):
        raise RuntimeError("some bug")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(RuntimeError, match="^some bug$"):
        trainer.save_model(str(tmp_path / "final"))


# ============================================================================ arguments fail before the model loads
BAD_FLAGS = [
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
    (["--max_steps", "-5"], "--max_steps must be a positive number of optimizer steps, or -1"),
    (["--max_steps", "0"], "--max_steps must be a positive number"),
    (["--learning_rate=-1e-4"], "--learning_rate must be >= 0"),
    (["--learning_rate", "-0.001"], "--learning_rate must be >= 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
    (["--num_train_epochs", "-1"], "--num_train_epochs must be >= 0"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=["".join(f[0]) for f in BAD_FLAGS])
def test_bad_schedule_arguments_are_refused_naming_the_flag(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        parse_train_args(["--output_dir", str(tmp_path), "--use_cpu", "true", *flags])


def test_good_schedule_arguments_still_parse(tmp_path):
    _, a = parse_train_args(["--output_dir", str(tmp_path), "--use_cpu", "true", "--max_steps", "-1",
                             "--num_train_epochs", "0.5", "--learning_rate", "0", "--gradient_accumulation_steps", "1"])
    assert a.max_steps == -1 and a.num_train_epochs == 0.5 and a.learning_rate == 0


def test_cli_bad_argument_is_one_line_exit_2_before_the_model_loads(tmp_path):
    proc = run_cli("--model_name_or_path", str(tmp_path / "no_such_model"), "--data_file_paths", "x.jsonl",
                   "--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--max_steps", "-5")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--max_steps" in errors[0], proc.stderr


def test_cli_without_arguments_prints_the_usage_and_one_error_line():
    proc = run_cli()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("usage: python -m padt.train")
    assert proc.stderr.strip().splitlines()[-1] == "python -m padt.train: error: --model_name_or_path is required"


# ============================================================================ one run per output folder
def test_lock_is_refused_while_held_and_released_after(tmp_path):
    first = OutputDirLock(tmp_path)
    with first:
        assert (tmp_path / LOCK_NAME).read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(OutputDirLocked, match=rf"in use by another training run \(pid {os.getpid()} on host"):
            OutputDirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    with OutputDirLock(tmp_path):  # free again
        pass


def test_a_stale_lock_is_taken_over_with_a_log_line(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(f"{dead.pid} {socket.gethostname()}\n")
    with caplog.at_level(logging.WARNING, logger="padt.train.run"), OutputDirLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert f"taking over the stale lock {tmp_path / LOCK_NAME} of process {dead.pid}" in caplog.text


def test_a_lock_of_another_host_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text("12345 some-other-host\n")
    with pytest.raises(OutputDirLocked, match="pid 12345 on host some-other-host"):
        OutputDirLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text() == "12345 some-other-host\n"


def test_only_the_main_rank_takes_the_lock(tmp_path, monkeypatch):
    with OutputDirLock(tmp_path):
        monkeypatch.setenv("RANK", "1")
        other = OutputDirLock(tmp_path)
        other.acquire()  # neither waits nor raises
        other.release()
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())  # not released by rank 1


def test_main_releases_the_lock_when_training_fails(tmp_path, monkeypatch):
    from padt.train import run

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(run, "_train", boom)
    with pytest.raises(RuntimeError, match="boom"):
        main(["--model_name_or_path", "m", "--data_file_paths", "d", "--output_dir", str(tmp_path), "--use_cpu",
              "true"])
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_run_on_a_busy_output_folder_is_refused_then_takes_over_when_the_first_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys, time; from padt.train.run import OutputDirLock; "
                                "OutputDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"),
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ("--model_name_or_path", str(tmp_path / "no_such_model"), "--data_file_paths", "x.jsonl",
                "--output_dir", str(tmp_path), "--use_cpu", "true")
        proc = run_cli(*argv)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"in use by another training run (pid {holder.pid} on host" in proc.stderr.splitlines()[-1]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(holder.pid)  # SIGKILL left it behind
    proc = run_cli(*argv)  # the dead holder's lock is taken over; the run then fails on the missing model
    assert "taking over the stale lock" in proc.stderr and "in use by another" not in proc.stderr
    assert not (tmp_path / LOCK_NAME).exists()
