"""RIC captions (COCO-format files whose images carry tagged ``captions``) -> RIC JSONL in the released
PaDT-MLLM/ReferringImageCaptioning format (one line per caption).

    python src/preprocess/process_ric.py --ann-dir data/ric --output-dir data/padt/RIC
    # reads  ric_instances_train2017.json, ric_instances_val2017.json
    # writes data/padt/RIC/ric_instances_train2017.json, .../ric_instances_val2017.json

The raw RIC captions were not released by the authors (GitHub issue Gorilla-Lab-SCUT/PaDT#23); any file in this
layout works. No randomness.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from padt.geometry.masks import ForegroundRule
from padt.preprocess import GridSpec, SkipReport, load_coco_instances, ric_records
from padt.preprocess.cli import run_script, script_parser, write_split
from padt.preprocess.ric import DEFAULT_CAPTION_ENDINGS


def add_own_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ann-dir", required=True, help="folder with ric_instances_<split>.json")
    p.add_argument("--splits", nargs="+", default=["train2017", "val2017"], help="default: train2017 val2017")
    p.add_argument("--output-dir", required=True, help="writes <output-dir>/ric_instances_<split>.json")
    p.add_argument("--caption-endings", nargs="+", default=list(DEFAULT_CAPTION_ENDINGS),
                   help="captions must end with one of these (default: . \" \u201d); others are skipped")
    p.add_argument("--max-side", type=int, default=0, help="skip images whose longer side is over this; 0: off")


def build_parser() -> argparse.ArgumentParser:
    return script_parser(__doc__, add_own_args, "ric")


def convert(args: argparse.Namespace, grid: GridSpec, rule: ForegroundRule, reports: dict[str, SkipReport]) -> None:
    for split in args.splits:
        coco = load_coco_instances(Path(args.ann_dir) / f"ric_instances_{split}.json", what="RIC file")
        report = reports[split] = SkipReport()
        records = ric_records(
            coco, grid=grid, rule=rule, report=report, caption_endings=args.caption_endings,
            max_side=args.max_side or None, image_root=args.image_root, progress=not args.no_progress,
        )
        write_split(records, Path(args.output_dir) / f"ric_instances_{split}.json", report, f"ric {split}")


def main(argv: list[str] | None = None) -> int:
    return run_script(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
