"""Pretrain the vision tower of a from-scratch PaDT model on the shapes scenes' cell classes (library:
`padt/shapes/vision_pretrain.py`, which says why), then save the whole model as the start of `padt.train`.

    python src/pretrain_shapes_vision.py --model OUT/init --data OUT/data [MORE_DATA...] --out OUT/init_vision

Each data folder is a `src/preprocess/make_shapes.py` output: its `ovd_train.jsonl` (one record per image, every
object's mask and kind) gives the training cells; the first folder's `ovd_val.jsonl` gives the reported accuracy.
With `--cell-classes colour_kind` the classes are colour x kind, read from `coco_train.json` / `coco_val.json`.
A rerun resumes from the last checkpoint in OUT/init_vision/trainer.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from padt.shapes import CELL_CLASS_SETS, cell_class_names


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="PaDT model folder to start from (e.g. padt.testing.models output)")
    ap.add_argument("--data", required=True, nargs="+", help="shapes data folder(s) with manifest.json")
    ap.add_argument("--out", required=True, help="folder for the pretrained model (and its trainer checkpoints)")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    ap.add_argument("--learning-rate", type=float, default=2e-3, help="peak rate, cosine schedule (default 2e-3)")
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--min-coverage", type=float, default=0.3,
                    help="least fraction of a cell an object must cover to give the cell its class (default 0.3)")
    ap.add_argument("--cell-classes", choices=CELL_CLASS_SETS, default="kind",
                    help="what a cell's class names: the object's kind (default; from ovd_*.jsonl) or its colour and "
                         "kind (from coco_*.json attributes; an experiment, see docs/shapes.md)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-images", type=int, default=300,
                    help="held-out images of the first folder's val split to report accuracy on (0 = none)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        ap.error("--steps and --batch-size must be >= 1")

    from transformers import TrainingArguments

    from padt.shapes.vision_pretrain import load_cell_records, load_coco_cell_records, pretrain_vision

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    folders = [Path(d) for d in args.data]
    for folder in folders:
        if not (folder / "manifest.json").is_file():
            ap.error(f"{folder} has no manifest.json: pass folders written by src/preprocess/make_shapes.py")
    options = json.loads((folders[0] / "manifest.json").read_text())["options"]
    images = [f / "images" for f in folders]
    class_names = cell_class_names(options, args.cell_classes)
    if args.cell_classes == "kind":
        train = load_cell_records([f / "ovd_train.jsonl" for f in folders], images)
        held_out = load_cell_records([folders[0] / "ovd_val.jsonl"], images[:1]) if args.eval_images else []
    else:
        train = load_coco_cell_records([f / "coco_train.json" for f in folders], images, ("colour", "kind"))
        held_out = []
        if args.eval_images:
            held_out = load_coco_cell_records([folders[0] / "coco_val.json"], images[:1], ("colour", "kind"))
    held_out = held_out[: args.eval_images]
    training_args = TrainingArguments(
        max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=args.warmup_steps,
        weight_decay=0.0, seed=args.seed, data_seed=args.seed, logging_steps=50, save_steps=500, save_total_limit=1,
        report_to="none", use_cpu=True, dataloader_num_workers=0,
    )
    report = pretrain_vision(args.model, train, class_names, args.out, training_args, held_out, args.min_coverage)
    report.update(cell_classes=args.cell_classes, num_classes=len(class_names), steps=args.steps,
                  batch_size=args.batch_size, training_images=len(train))
    (Path(args.out) / "vision_pretrain.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
