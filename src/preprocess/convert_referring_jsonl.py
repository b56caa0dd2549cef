"""Your own referring data (minimal JSONL: image, sentence(s), box and/or mask) -> REC/RES JSONL
(same format as PaDT-MLLM/RefCOCO).

    python src/preprocess/convert_referring_jsonl.py --input my_refs.jsonl --output data/padt/my_refs.jsonl \
        --image-root my_data/images

Input line: {"image": "a.jpg", "sentence": "the red mug", "bbox": [x1, y1, x2, y2], "mask": <COCO RLE or polygons>,
"height": H, "width": W, "id": 7}; see docs/preprocessing.md for every field. No randomness.
"""

from __future__ import annotations

import argparse
import sys

from padt.geometry.masks import ForegroundRule
from padt.preprocess import GridSpec, SkipReport, referring_jsonl_records
from padt.preprocess.cli import run_script, script_parser, write_split
from padt.preprocess.custom import BBOX_FORMATS


def add_own_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="minimal referring JSONL")
    p.add_argument("--output", required=True, help="output JSONL path")
    p.add_argument("--bbox-format", choices=BBOX_FORMATS, default="xyxy", help="pixel box layout (default xyxy)")


def build_parser() -> argparse.ArgumentParser:
    return script_parser(__doc__, add_own_args, "refering")


def convert(args: argparse.Namespace, grid: GridSpec, rule: ForegroundRule, reports: dict[str, SkipReport]) -> None:
    report = reports["output"] = SkipReport()
    records = referring_jsonl_records(
        args.input, grid=grid, rule=rule, report=report, image_root=args.image_root,
        bbox_format=args.bbox_format, progress=not args.no_progress,
    )
    write_split(records, args.output, report, f"convert {args.input}")


def main(argv: list[str] | None = None) -> int:
    return run_script(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
