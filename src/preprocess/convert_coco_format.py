"""Your own COCO-format detection or segmentation dataset -> OVD JSONL (same format as PaDT-MLLM/COCO).

    python src/preprocess/convert_coco_format.py --annotations my_data/train.json --output data/padt/my_train.jsonl \
        --image-root my_data/images --prompt-order shuffle --seed 0
    python src/preprocess/convert_coco_format.py --annotations my_data/val.json --output data/padt/my_val.jsonl \
        --prompt-order id

Annotations with a ``segmentation`` (polygons or RLE) get an ``rle`` and mask-derived cells; detection-only
annotations (no segmentation) get box-shaped cells and no ``rle`` (the mask loss skips them).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from padt.geometry.masks import ForegroundRule
from padt.preprocess import GridSpec, SkipReport, load_coco_instances, ovd_records
from padt.preprocess.cli import ovd_options_from_args, run_script, script_parser, write_split


def add_own_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", required=True, help="COCO-format JSON (images, annotations, categories)")
    p.add_argument("--output", required=True, help="output JSONL path")
    p.add_argument("--prompt-order", choices=("shuffle", "id"), default="shuffle",
                   help="shuffle (training data, default) or category-id order (evaluation data)")


def build_parser() -> argparse.ArgumentParser:
    return script_parser(__doc__, add_own_args, "ovd", ovd=True)


def convert(args: argparse.Namespace, grid: GridSpec, rule: ForegroundRule, reports: dict[str, SkipReport]) -> None:
    coco = load_coco_instances(args.annotations, what="COCO-format annotations")
    report = reports["output"] = SkipReport()
    records = ovd_records(
        coco, options=ovd_options_from_args(args, args.prompt_order == "shuffle"), grid=grid, rule=rule,
        rng=np.random.default_rng(args.seed), report=report, image_root=args.image_root,
        progress=not args.no_progress,
    )
    write_split(records, args.output, report, f"convert {args.annotations}")


def main(argv: list[str] | None = None) -> int:
    return run_script(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
