"""PaDTTrainer on the tiny random model: parameters change, every loss term is logged, the loss goes down, every
trainable parameter gets a gradient (also on batches without objects), resume equals an uninterrupted run, LoRA,
freezing, the prototype-projection ablation, the warm-up switch, arguments; DeepSpeed ZeRO-2/3 on CPU (slow)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from padt.testing.sft_data import make_tiny_sft_workspace
from padt.train.arguments import PaDTScriptArguments, PaDTTrainingArguments, parse_train_args
from padt.train.build import load_model
from padt.train.lora import lora_scale, merge_lora_checkpoint, merge_lora_state_dict
from padt.train.run import build_trainer
from padt.train.trainer import PaDTTrainer, build_criterion, epoch_of

ROOT = Path(__file__).resolve().parents[1]
LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "loss_score", "loss_dice", "loss_mask", "iou", "giou",
              "sft_loss", "bbox_loss", "score_loss", "mask_loss")
RUN_FACTS = ("samples_per_second", "tokens_per_second", "objects_per_sample", "batches_without_objects")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """8 records (3 without objects) + the tiny model and processor."""
    return make_tiny_sft_workspace(tmp_path_factory.mktemp("tiny_ws"), num_images=8, num_empty=3)


@pytest.fixture(scope="module")
def small_workspace(tmp_path_factory) -> dict[str, Path]:
    """2 records, both with objects (the learning test overfits them)."""
    return make_tiny_sft_workspace(tmp_path_factory.mktemp("tiny_ws2"), num_images=2, num_empty=0)


def script_args(ws: dict[str, Path], **kw) -> PaDTScriptArguments:
    return PaDTScriptArguments(model_name_or_path=str(ws["model"]), data_file_paths=str(ws["data_file"]),
                               image_folders=str(ws["image_folder"]), max_pixels=50176, **kw)


def train_args(out: Path, **kw) -> PaDTTrainingArguments:
    base = {"output_dir": str(out), "use_cpu": True, "bf16": False, "report_to": "none",
            "per_device_train_batch_size": 2, "learning_rate": 2e-3, "lr_scheduler_type": "constant",
            "logging_steps": 1, "save_strategy": "no", "warmup_prototype_steps": 1, "activation_checkpointing": False,
            "disable_tqdm": True, "seed": 42, "data_seed": 42, "dataloader_num_workers": 0}
    base.update(kw)
    return PaDTTrainingArguments(**base)


def build(ws: dict[str, Path], args: PaDTTrainingArguments, callbacks=None, **script_kw) -> PaDTTrainer:
    return build_trainer(script_args(ws, **script_kw), args, callbacks=callbacks)


def step_logs(trainer: PaDTTrainer) -> dict[int, dict]:
    return {e["step"]: e for e in trainer.state.log_history if "loss_ce" in e}


# ============================================================================ training changes the model, logs terms
def test_train_changes_llm_projection_decoder_and_logs_every_term(workspace, tmp_path):
    trainer = build(workspace, train_args(tmp_path, max_steps=3, report_to="tensorboard"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    for name in ("model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.1.mlp.up_proj.weight",
                 "lm_head.weight", "model.visual.blocks.0.attn.qkv.weight", "vis_norm.weight", "vis_proj.0.weight",
                 "vis_proj.1.weight", "vl_decoder.input_projection.1.weight", "vl_decoder.bbox_prediction.0.weight",
                 "vl_decoder.score_prediction.weight", "vl_decoder.mask_output_mlp.0.weight"):
        assert not torch.equal(before[name], after[name].detach()), f"{name} did not change"
    logs = step_logs(trainer)
    assert sorted(logs) == [1, 2, 3]
    for step, entry in logs.items():
        for key in LOSS_TERMS + RUN_FACTS:
            assert key in entry, f"step {step} lacks {key}"
            assert math.isfinite(entry[key]), (step, key, entry[key])
        assert entry["samples_per_second"] > 0 and entry["tokens_per_second"] > entry["samples_per_second"]
    assert list(tmp_path.rglob("events.out.tfevents.*")), "report_to=tensorboard wrote no event file"
    with_objects = [e for e in logs.values() if e["objects_per_sample"] > 0]
    assert with_objects and all(e["loss_giou"] > 0 and e["loss_dice"] > 0 for e in with_objects)
    # the authors' aggregates are the sums of our terms
    for e in with_objects:
        assert e["bbox_loss"] == pytest.approx(e["loss_giou"] + e["loss_bbox"], rel=1e-5)
        assert e["mask_loss"] == pytest.approx(e["loss_dice"] + e["loss_mask"], rel=1e-5)
        assert e["sft_loss"] == pytest.approx(e["loss_ce"], rel=1e-6)


def test_loss_decreases_when_overfitting_two_samples(small_workspace, tmp_path):
    """A learning test: 12 steps on one batch of 2 samples (2 objects); the decoder warms up on prototypes for 5."""
    trainer = build(small_workspace, train_args(tmp_path, max_steps=12, learning_rate=5e-3, warmup_prototype_steps=5))
    trainer.train()
    logs = step_logs(trainer)
    first = [logs[s] for s in (1, 2, 3)]
    last = [logs[s] for s in (10, 11, 12)]

    def mean(entries, key):
        return sum(e[key] for e in entries) / len(entries)

    assert mean(last, "loss") < 0.65 * mean(first, "loss"), (mean(first, "loss"), mean(last, "loss"))
    assert mean(last, "loss_ce") < 0.6 * mean(first, "loss_ce")
    assert mean(last, "loss_giou") < mean(first, "loss_giou") - 0.05
    assert mean(last, "iou") > mean(first, "iou") + 0.05


# ============================================================================ DDP invariant: every parameter learns
def _grads_after_one_batch(ws, tmp_path, indices, **kw):
    trainer = build(ws, train_args(tmp_path, **kw))
    model = trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in indices])
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, batch


@pytest.mark.parametrize("indices", [(0, 1), (3, 4)], ids=["no_objects", "objects"])
def test_every_trainable_parameter_gets_a_gradient(workspace, tmp_path, indices):
    """DDP runs without find_unused_parameters: a rank whose batch has no object must still reach every parameter."""
    grads, batch = _grads_after_one_batch(workspace, tmp_path, indices)
    assert (batch["num_objects"] == 0) == (indices == (0, 1))
    missing = sorted(n for n, g in grads.items() if g is None)
    assert not missing, missing[:10]


@pytest.mark.parametrize("switch", ["use_mask_loss", "use_bbox_loss", "use_score_loss", "all_decoder_losses"])
def test_ablations_keep_every_trainable_parameter_reached(workspace, tmp_path, switch):
    off = ({"use_mask_loss": False, "use_bbox_loss": False, "use_score_loss": False}
           if switch == "all_decoder_losses" else {switch: False})
    grads, _ = _grads_after_one_batch(workspace, tmp_path, (3, 4), robust_ce=False, num_vrt="all", **off)
    assert not sorted(n for n, g in grads.items() if g is None)
    if switch == "all_decoder_losses":
        assert not any(n.startswith("vl_decoder.") for n in grads), "an unused decoder must be frozen"


# ============================================================================ warm-up, epochs, resume
def test_decoder_warmup_uses_prototypes_for_the_first_steps(workspace, tmp_path, monkeypatch):
    from padt.train import step as training_step

    seen = []
    real = training_step.compute_padt_loss

    def spy(model, batch, *, criterion, use_prototype_features):
        seen.append(use_prototype_features)
        return real(model, batch, criterion=criterion, use_prototype_features=use_prototype_features)

    monkeypatch.setattr(training_step, "compute_padt_loss", spy)
    build(workspace, train_args(tmp_path, max_steps=4, warmup_prototype_steps=2)).train()
    assert seen == [True, True, False, False]


class StopAt(TrainerCallback):
    """Ends training after step `k` (a kill right after the checkpoint of step k)."""

    def __init__(self, k: int):
        self.k = k

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.k:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_from_checkpoint_equals_uninterrupted_run(workspace, tmp_path, workers):
    """k = 3 steps, killed, resumed to k + m = 6: same losses as one run (same order, same VRT picks). 8 samples in
    batches of 2 make 4 steps per epoch, so the resumed part crosses an epoch boundary; warm-up ends after step 4.
    The interrupted run may load batches in a worker process (it copies the collator, so the epoch must be set before
    it starts); the reference run loads them in the main process."""
    common = {"max_steps": 6, "warmup_prototype_steps": 4, "dataloader_num_workers": workers}
    full = build(workspace, train_args(tmp_path / "full", **{**common, "dataloader_num_workers": 0}))
    full.train()
    killed = build(workspace, train_args(tmp_path / "killed", save_strategy="steps", save_steps=3, **common),
                   callbacks=[StopAt(3)])
    killed.train()
    assert killed.state.global_step == 3 and (tmp_path / "killed" / "checkpoint-3").is_dir()
    resumed = build(workspace, train_args(tmp_path / "killed", save_strategy="steps", save_steps=3, **common))
    resumed.train(resume_from_checkpoint=str(tmp_path / "killed" / "checkpoint-3"))
    a, b = step_logs(full), step_logs(resumed)
    assert sorted(b) == list(range(1, 7))  # steps 1-3 come back with the checkpoint's log history
    for step in (4, 5, 6):
        for key in ("loss", "loss_ce", "loss_giou", "loss_mask", "objects_per_sample"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert epoch_of(resumed.state) == 1 and resumed.data_collator.epoch == 1


def test_vrt_picks_change_with_the_epoch(workspace, tmp_path):
    trainer = build(workspace, train_args(tmp_path))
    collator, item = trainer.data_collator, trainer.train_dataset[5]
    picks = []
    for epoch in (0, 1, 0):
        collator.set_epoch(epoch)
        picks.append(collator.sample_picks(item))
    assert picks[0] == picks[2] and picks[0] != picks[1]


# ============================================================================ LoRA, freezing, ablation from a base model
def test_lora_trains_adapters_and_padt_modules_then_merges(workspace, tmp_path):
    args = train_args(tmp_path / "lora", max_steps=2, use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    trainer = build(workspace, args)
    named = dict(trainer.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable)
    assert all(".lora_" in n or n.split(".")[0] in ("vis_norm", "vis_proj", "vl_decoder") for n in trainable)
    assert not any(n.startswith("model.visual.") for n in trainable)
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.train()
    base = "model.language_model.layers.0.self_attn.q_proj"
    assert torch.equal(before[f"{base}.base_layer.weight"], named[f"{base}.base_layer.weight"])
    assert not torch.equal(before[f"{base}.lora_B.default.weight"], named[f"{base}.lora_B.default.weight"])
    assert not torch.equal(before["vl_decoder.bbox_prediction.0.weight"], named["vl_decoder.bbox_prediction.0.weight"])

    out = tmp_path / "merged"
    trainer.save_model(str(out))
    assert merge_lora_checkpoint(out, lora_scale(args)) == 2 * 7  # 2 layers x 7 linear layers
    from padt.model.backbones.qwen2_5_vl import PaDTForConditionalGeneration

    merged, info = PaDTForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (3, 4)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                    "mm_token_type_ids")}
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(**inputs, use_cache=False).logits
        got = merged.eval()(**inputs, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_merge_lora_state_dict_arithmetic():
    a, b = torch.randn(2, 3), torch.randn(4, 2)
    sd = {"x.base_layer.weight": torch.randn(4, 3), "x.base_layer.bias": torch.randn(4), "x.lora_A.default.weight": a,
          "x.lora_B.default.weight": b, "y.weight": torch.ones(1)}
    out = merge_lora_state_dict(sd, 0.5)
    assert sorted(out) == ["x.bias", "x.weight", "y.weight"]
    torch.testing.assert_close(out["x.weight"], sd["x.base_layer.weight"] + 0.5 * b @ a)
    with pytest.raises(ValueError, match="LoRA pair"):
        merge_lora_state_dict({"x.base_layer.weight": torch.ones(1, 1)}, 1.0)


def test_freeze_vision_keeps_the_vit_fixed(workspace, tmp_path):
    trainer = build(workspace, train_args(tmp_path, max_steps=2, freeze_vision=True))
    vit = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith("model.visual.")}
    assert vit and not any(p.requires_grad for n, p in trainer.model.named_parameters() if n in vit)
    trainer.train()
    now = dict(trainer.model.named_parameters())
    assert all(torch.equal(v, now[n]) for n, v in vit.items())


@pytest.fixture(scope="module")
def base_qwen_dir(workspace, tmp_path_factory) -> Path:
    """A vanilla Qwen2.5-VL checkpoint (no PaDT fields) with the tiny model's geometry."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with open(workspace["model"] / "config.json", encoding="utf-8") as f:
        raw = json.load(f)
    for key in ("vl_decoder", "use_visual_prototype_projection", "visual_prototype_rank", "vrt_feature_order",
                "decoder_attn_implementation", "mask_unused_token_rows", "num_tokenizer_tokens", "architectures"):
        raw.pop(key, None)
    out = tmp_path_factory.mktemp("base_qwen")
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(raw)).save_pretrained(out)
    return out


@pytest.mark.parametrize("projection", [True, False])
def test_prototype_projection_switch_applies_to_a_base_model(workspace, base_qwen_dir, tmp_path, projection):
    args = train_args(tmp_path, use_visual_prototype_projection=projection)
    s = script_args(workspace)
    s.model_name_or_path = str(base_qwen_dir)
    model = load_model(s, args)
    assert model.config.use_visual_prototype_projection is projection
    assert (model.vis_proj is not None) is projection
    if projection:  # a fresh PaDT start: prototypes begin at exactly zero (docs/method.md#visual-reference-prototypes)
        assert torch.count_nonzero(model.vis_norm.weight) == 0


def test_prototype_projection_switch_conflicting_with_a_padt_checkpoint_raises(workspace, tmp_path):
    with pytest.raises(ValueError, match="only applies when starting from a base"):
        load_model(script_args(workspace), train_args(tmp_path, use_visual_prototype_projection=False))


# ============================================================================ arguments
def test_arguments_yaml_cli_override_and_validation(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 1.0e-4\nnum_vrt: all\nuse_mask_loss: false\nbf16: false\nuse_cpu: true\n"
                   f"output_dir: {tmp_path / 'o'}\nmodel_name_or_path: m\n")
    s, a = parse_train_args(["--config", str(cfg), "--learning_rate", "3e-5", "--mask_loss_coef", "2"])
    assert a.learning_rate == 3e-5 and a.vrt_per_object is None and s.model_name_or_path == "m"
    assert a.loss_weights() == {"loss_ce": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0, "loss_score": 1.0}
    assert build_criterion(a).loss_keys == ("loss_ce", "loss_bbox", "loss_giou", "loss_score")
    assert a.remove_unused_columns is False and a.activation_checkpointing is True and a.data_seed == 42
    assert a.ddp_find_unused_parameters is False  # the Trainer would search for them without activation checkpointing
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True does not work"):
        train_args(tmp_path, ddp_find_unused_parameters=True)
    with pytest.raises(ValueError, match="unknown command-line argument"):
        parse_train_args(["--config", str(cfg), "--nope", "1"])
    cfg.write_text("nope: 1\n")
    with pytest.raises(ValueError, match="nope"):
        parse_train_args(["--config", str(cfg)])
    for bad in ({"num_vrt": "0"}, {"num_vrt": "many"}, {"remove_unused_columns": True}, {"bbox_loss_coef": -1.0},
                {"attn_implementation": "magic"}):
        with pytest.raises(ValueError):
            train_args(tmp_path, **bad)
    with pytest.raises(ValueError, match="model_name_or_path"):
        PaDTScriptArguments(data_file_paths="x").check_complete()


def test_gradient_accumulation_contract():
    """Our loss is a per-micro-batch mean: the Trainer must divide it by the accumulation steps (see trainer doc)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert Qwen2_5_VLForConditionalGeneration.accepts_loss_kwargs is False
    assert PaDTTrainer.loss_is_scaled_for_ga is False


# ============================================================================ DeepSpeed on CPU (one-off op compile)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two_steps(ws: dict[str, Path], out: Path, nproc: int, *flags: str) -> list[dict]:
    """`torchrun -m padt.train` (tiny CPU config, gloo, one thread per process) for 2 steps; returns the logged loss
    entries, checked to be steps 1 and 2 with finite losses."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), "-m", "padt.train", "--config", str(ROOT / "configs/train/tiny_cpu.yaml"),
           "--model_name_or_path", str(ws["model"]), "--data_file_paths", str(ws["data_file"]),
           "--image_folders", str(ws["image_folder"]), "--output_dir", str(out), "--ddp_backend", "gloo",
           "--max_steps", "2", "--save_steps", "2", *flags]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss_ce" in e]
    assert [e["step"] for e in losses] == [1, 2] and all(math.isfinite(e["loss"]) for e in losses)
    return losses


def test_two_process_ddp_run_on_cpu(workspace, tmp_path):
    """Plain DDP (torchrun, 2 CPU processes, gloo) without activation checkpointing, as the shapes script trains. The
    Trainer searches for unused parameters there unless told not to, and DDP then failed at the first backward
    ("Expected to mark a variable ready only once": the decoder runs outside the wrapped forward)."""
    losses = _torchrun_two_steps(workspace, tmp_path / "ddp", 2, "--activation_checkpointing", "false")
    # 8 records, 1 per process and step: two processes make an epoch of 4 steps (one process: 8)
    assert losses[-1]["epoch"] == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("stage,lora", [(2, False), (3, False), (3, True)], ids=["zero2", "zero3", "zero3_lora"])
def test_deepspeed_tiny_run_on_cpu(workspace, tmp_path, stage, lora):
    """`python -m padt.train --deepspeed configs/deepspeed/zero{2,3}.json` on one CPU process (gloo): trains, logs,
    saves a model that loads back (with LoRA: merged, no adapter keys left)."""
    out = tmp_path / f"zero{stage}"
    lora_flags = ["--use_lora", "true", "--lora_r", "4", "--lora_alpha", "8"] if lora else []
    _torchrun_two_steps(workspace, out, 1, "--deepspeed", str(ROOT / f"configs/deepspeed/zero{stage}.json"),
                        *lora_flags)
    from padt.model.backbones.qwen2_5_vl import PaDTForConditionalGeneration

    _, info = PaDTForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_decoder_lr_scale_gives_the_decoder_its_own_rate(workspace, tmp_path):
    trainer = build(workspace, train_args(tmp_path, decoder_lr_scale=4.0, weight_decay=0.1,
                                          lr_scheduler_type="linear", max_steps=10))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    decoder = {id(p) for n, p in trainer.model.named_parameters() if n.startswith("vl_decoder.")}
    other = {id(p) for n, p in trainer.model.named_parameters() if p.requires_grad and id(p) not in decoder}
    groups = [g for g in trainer.optimizer.param_groups if g["params"]]
    seen = set()
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= decoder or ids <= other  # no group mixes the two
        assert g["initial_lr"] == pytest.approx(2e-3 * (4.0 if ids <= decoder else 1.0))
        seen |= ids
    assert seen == decoder | other  # every trainable parameter is optimised, once
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1}  # the Trainer's decay split is kept
    trainer.lr_scheduler.step()
    ratios = {g["lr"] / g["initial_lr"] for g in groups}
    assert len({round(r, 9) for r in ratios}) == 1  # one schedule for both rates
    with pytest.raises(ValueError, match="decoder_lr_scale"):
        train_args(tmp_path, decoder_lr_scale=0.0)


def test_vision_lr_scale_with_decoder_lr_scale_gives_three_rates(workspace, tmp_path):
    trainer = build(workspace, train_args(tmp_path, decoder_lr_scale=4.0, vision_lr_scale=0.1, max_steps=10))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
    expected = {}
    for pid, name in names.items():
        parts = name.split(".")
        expected[pid] = 2e-3 * (4.0 if "vl_decoder" in parts else 0.1 if "visual" in parts else 1.0)
    assert any(v == pytest.approx(2e-4) for v in expected.values())  # the tower is trainable here
    seen = {}
    for g in trainer.optimizer.param_groups:
        for p in g["params"]:
            assert id(p) not in seen
            seen[id(p)] = g["initial_lr"]
    assert seen.keys() == expected.keys()
    assert all(seen[k] == pytest.approx(v) for k, v in expected.items())
    with pytest.raises(ValueError, match="vision_lr_scale"):
        train_args(tmp_path, vision_lr_scale=-1.0)
