"""Your own referring data (minimal JSONL: image, sentence(s), box and/or mask) -> REC/RES JSONL
(same format as PaDT-MLLM/RefCOCO).

    python src/preprocess/convert_referring_jsonl.py --input my_refs.jsonl --output data/padt/my_refs.jsonl \
        --image-root my_data/images

Input line: {"image": "a.jpg", "sentence": "the red mug", "bbox": [x1, y1, x2, y2], "mask": <COCO RLE or polygons>,
"height": H, "width": W, "id": 7}; see docs/preprocessing.md for every field. No randomness.
"""

from __future__ import annotations

import argparse
import pickle
import sys

from padt.preprocess import SkipReport, referring_jsonl_records
from padt.preprocess.cli import (
    INPUT_ERRORS,
    add_grid_args,
    add_rule_args,
    add_run_args,
    finish,
    grid_from_args,
    report_input_error,
    rule_from_args,
    write_split,
)
from padt.preprocess.custom import BBOX_FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="minimal referring JSONL")
    p.add_argument("--output", required=True, help="output JSONL path")
    p.add_argument("--bbox-format", choices=BBOX_FORMATS, default="xyxy", help="pixel box layout (default xyxy)")
    add_grid_args(p)
    add_rule_args(p, "refering")
    add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = SkipReport()
    try:
        grid, rule = grid_from_args(args), rule_from_args(args)
        records = referring_jsonl_records(
            args.input, grid=grid, rule=rule, report=report, image_root=args.image_root,
            bbox_format=args.bbox_format, progress=not args.no_progress,
        )
        write_split(records, args.output, report, f"convert {args.input}")
    except INPUT_ERRORS + (pickle.UnpicklingError,) as err:
        return report_input_error(err)
    return finish({"output": report}, args)


if __name__ == "__main__":
    sys.exit(main())
