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
import pickle
import sys

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
    p.add_argument("--annotations", required=True, help="COCO-format JSON (images, annotations, categories)")
    p.add_argument("--output", required=True, help="output JSONL path")
    p.add_argument("--prompt-order", choices=("shuffle", "id"), default="shuffle",
                   help="shuffle (training data, default) or category-id order (evaluation data)")
    add_ovd_args(p)
    add_grid_args(p)
    add_rule_args(p, "ovd")
    add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = SkipReport()
    try:
        grid, rule = grid_from_args(args), rule_from_args(args)
        coco = load_coco_instances(args.annotations, what="COCO-format annotations")
        records = ovd_records(
            coco, options=ovd_options_from_args(args, args.prompt_order == "shuffle"), grid=grid, rule=rule,
            rng=np.random.default_rng(args.seed), report=report, image_root=args.image_root,
            progress=not args.no_progress,
        )
        write_split(records, args.output, report, f"convert {args.annotations}")
    except INPUT_ERRORS + (pickle.UnpicklingError,) as err:
        return report_input_error(err)
    return finish({"output": report}, args)


if __name__ == "__main__":
    sys.exit(main())
