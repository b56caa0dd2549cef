"""The shapes benchmark in CI: a short from-scratch run learns REC, and the shipped checkpoint grounds held-out scenes.

Both go through the user's paths: `python -m padt.train`'s `main`, `PaDTPredictor` and the evaluation pipeline of
`eval/evaluate.py` (`evaluate_split`), on scenes written by `padt.shapes.generate_dataset`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from padt.evaluation.data import load_samples, referred_object
from padt.evaluation.metrics.rec import accuracy_at, top1_box_ious
from padt.evaluation.pipeline import EvalOptions, evaluate_split
from padt.inference.predictor import PaDTPredictor
from padt.shapes import ShapesConfig, generate_dataset
from padt.testing.models import build_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "padt" / "assets" / "tiny_default"


def rec_accuracy(model_dir: Path, data_dir: Path, split: str, out_dir: Path) -> dict:
    """REC metrics (`Acc@0.5`, `mean_IoU`) of `model_dir` on `data_dir/refer_{split}.jsonl`, as `eval/evaluate.py
    --task rec` computes them."""
    options = EvalOptions(task="rec", batch_size=16, max_new_tokens=64, progress=False)
    return evaluate_split(lambda: PaDTPredictor.from_pretrained(model_dir, device="cpu"),
                          data_dir / f"refer_{split}.jsonl", data_dir / "images", out_dir, options,
                          model_id=str(model_dir))["metrics"]


def chance_accuracy(data_dir: Path, split: str) -> float:
    """Acc@0.5 of the best image-blind answer: the mean ground-truth box for every sentence."""
    samples = load_samples(data_dir / f"refer_{split}.jsonl", data_dir / "images", "rec")
    gt = np.array([referred_object(s)["bbox"] for s in samples], dtype=float)  # normalised xyxy
    mean = gt.mean(0).tolist()
    return accuracy_at(top1_box_ious([mean] * len(gt), gt.tolist()), 0.5)


# --------------------------------------------------------------------------- short training run
SMALL_SCENES = ShapesConfig(height=112, width=112, colours=("red", "green", "blue"), backgrounds=("gray", "black"),
                            min_objects=1, max_objects=1, size_range=(0.35, 0.6))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny PaDT trained from scratch for 150 steps (batch 8, about 30 s) on 24 one-object scenes; returns the loss
    history and the paths."""
    from padt.train.run import main

    root = tmp_path_factory.mktemp("shapes_learning")
    data = root / "data"
    generate_dataset(data, {"train": 24}, seed=3, config=SMALL_SCENES)
    pixels = SMALL_SCENES.height * SMALL_SCENES.width  # min = max: the processor keeps the scenes as they are
    build_tiny_checkpoint(
        str(root / "init"), seed=0, placeholder=False, min_pixels=pixels, max_pixels=pixels,
        text_hidden_size=64, text_layers=2, vision_hidden_size=32, vision_depth=2, vision_heads=2, window_size=SMALL_SCENES.width,
        text_rope_theta=10.0, mrope_section=[2, 3, 3], vision_rope_theta=100.0, vrt_feature_order="merge_block",
    )
    run = root / "run"
    torch.manual_seed(0)
    main([
        "--config", str(ROOT / "configs" / "train" / "tiny_shapes.yaml"),
        "--model_name_or_path", str(root / "init"),
        "--data_file_paths", str(data / "refer_train.jsonl"), "--image_folders", str(data / "images"),
        "--output_dir", str(run), "--max_steps", "150", "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-2", "--warmup_steps", "5", "--warmup_prototype_steps", "0",
        "--min_pixels", str(pixels), "--max_pixels", str(pixels), "--logging_steps", "1",
        "--save_strategy", "no", "--disable_tqdm", "true",
    ])
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return {"root": root, "data": data, "run": run, "init": root / "init",
            "losses": [e["loss"] for e in history if "loss_ce" in e]}


def test_short_training_lowers_the_loss_clearly(trained):
    losses = trained["losses"]
    assert len(losses) == 150
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"


def test_short_training_raises_rec_accuracy_above_chance(trained):
    chance = chance_accuracy(trained["data"], "train")
    before = rec_accuracy(trained["init"], trained["data"], "train", trained["root"] / "eval_init")["Acc@0.5"]
    after = rec_accuracy(trained["run"], trained["data"], "train", trained["root"] / "eval_run")["Acc@0.5"]
    print(f"chance {chance:.3f} untrained {before:.3f} trained {after:.3f}")
    assert before <= chance + 0.05, (before, chance)
    assert after >= chance + 0.2, f"Acc@0.5 {after:.2f} after training, chance {chance:.2f}, untrained {before:.2f}"


# --------------------------------------------------------------------------- the shipped model
# The shipped model scores Acc@0.5 = 0.910 on these 256 fresh sentences (0.924 on 750 sentences of seed 9 and 0.920
# on the 767 held-out `val` ones of seed 0, docs/shapes.md); the goal set for it is 0.90.
SHIPPED_REC_BOUND = 0.90


def test_shipped_checkpoint_grounds_fresh_held_out_scenes(tmp_path):
    manifest = json.loads((SHIPPED / "training_data.json").read_text())
    seed = 20261122
    trained_seeds = {manifest["seed"], *(t["seed"] for t in manifest.get("training_sets", []))}
    assert seed not in trained_seeds
    generate_dataset(tmp_path / "data", {"test": 100}, seed=seed, config=ShapesConfig(**manifest["options"]))
    metrics = rec_accuracy(SHIPPED, tmp_path / "data", "test", tmp_path / "eval")
    chance = chance_accuracy(tmp_path / "data", "test")
    assert metrics["Acc@0.5"] >= max(SHIPPED_REC_BOUND, chance + 0.4), (metrics, chance)
