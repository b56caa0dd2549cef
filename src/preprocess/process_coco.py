"""COCO instances -> OVD JSONL in the released PaDT-MLLM/COCO format (one line per image).

    python src/preprocess/process_coco.py --ann-dir data/coco/annotations --output-dir data/padt/COCO
    # reads  instances_train2017.json, instances_val2017.json
    # writes data/padt/COCO/instances_train2017.json, .../instances_val2017.json  (JSON lines)

Training splits (name containing "train") get the shuffled, seeded prompt order with absent-category drops;
other splits list the categories in id order. See docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

from padt.preprocess import SkipReport, load_coco_instances, ovd_records
from padt.preprocess.cli import (
    INPUT_ERRORS,
    add_grid_args,
    add_ovd_args,
    add_rule_args,
    add_run_args,
    finish,
    grid_from_args,
    ovd_options_from_args,
    report_input_error,
    rule_from_args,
    write_split,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ann-dir", required=True, help="folder with instances_<split>.json")
    p.add_argument("--splits", nargs="+", default=["train2017", "val2017"], help="default: train2017 val2017")
    p.add_argument("--output-dir", required=True, help="writes <output-dir>/instances_<split>.json")
    p.add_argument("--prompt-order", choices=("auto", "shuffle", "id"), default="auto",
                   help="auto: shuffle for splits whose name contains 'train', id order otherwise")
    add_ovd_args(p)
    add_grid_args(p)
    add_rule_args(p, "ovd")
    add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reports = {}
    try:
        grid, rule = grid_from_args(args), rule_from_args(args)
        for split in args.splits:
            coco = load_coco_instances(Path(args.ann_dir) / f"instances_{split}.json")
            shuffle = args.prompt_order == "shuffle" or (args.prompt_order == "auto" and "train" in split)
            report = reports[split] = SkipReport()
            records = ovd_records(
                coco, options=ovd_options_from_args(args, shuffle), grid=grid, rule=rule,
                rng=np.random.default_rng(args.seed), report=report, image_root=args.image_root,
                progress=not args.no_progress,
            )
            write_split(records, Path(args.output_dir) / f"instances_{split}.json", report, f"coco {split}")
    except INPUT_ERRORS + (pickle.UnpicklingError,) as err:
        return report_input_error(err)
    return finish(reports, args)


if __name__ == "__main__":
    sys.exit(main())
