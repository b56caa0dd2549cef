"""COCO instances -> OVD JSONL in the released PaDT-MLLM/COCO format (one line per image).

    python src/preprocess/process_coco.py --ann-dir data/coco/annotations --output-dir data/padt/COCO
    # reads  instances_train2017.json, instances_val2017.json
    # writes data/padt/COCO/instances_train2017.json, .../instances_val2017.json  (JSON lines)

Training splits (name containing "train") get the shuffled, seeded prompt order with absent-category drops;
other splits list the categories in id order. See docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from padt.geometry.masks import ForegroundRule
from padt.preprocess import GridSpec, SkipReport, load_coco_instances, ovd_records
from padt.preprocess.cli import ovd_options_from_args, run_script, script_parser, write_split


def add_own_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ann-dir", required=True, help="folder with instances_<split>.json")
    p.add_argument("--splits", nargs="+", default=["train2017", "val2017"], help="default: train2017 val2017")
    p.add_argument("--output-dir", required=True, help="writes <output-dir>/instances_<split>.json")
    p.add_argument("--prompt-order", choices=("auto", "shuffle", "id"), default="auto",
                   help="auto: shuffle for splits whose name contains 'train', id order otherwise")


def build_parser() -> argparse.ArgumentParser:
    return script_parser(__doc__, add_own_args, "ovd", ovd=True)


def convert(args: argparse.Namespace, grid: GridSpec, rule: ForegroundRule, reports: dict[str, SkipReport]) -> None:
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


def main(argv: list[str] | None = None) -> int:
    return run_script(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
