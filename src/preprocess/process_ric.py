"""RIC captions (COCO-format files whose images carry tagged ``captions``) -> RIC JSONL in the released
PaDT-MLLM/ReferringImageCaptioning format (one line per caption).

    python src/preprocess/process_ric.py --ann-dir data/ric --output-dir data/padt/RIC
    # reads  ric_instances_train2017.json, ric_instances_val2017.json
    # writes data/padt/RIC/ric_instances_train2017.json, .../ric_instances_val2017.json

The raw RIC captions were not released by the authors (issue #23); any file in this layout works. No randomness.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from padt.preprocess import SkipReport, load_coco_instances, ric_records
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
from padt.preprocess.ric import DEFAULT_CAPTION_ENDINGS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ann-dir", required=True, help="folder with ric_instances_<split>.json")
    p.add_argument("--splits", nargs="+", default=["train2017", "val2017"], help="default: train2017 val2017")
    p.add_argument("--output-dir", required=True, help="writes <output-dir>/ric_instances_<split>.json")
    p.add_argument("--caption-endings", nargs="+", default=list(DEFAULT_CAPTION_ENDINGS),
                   help="captions must end with one of these (default: . \" \u201d); others are skipped")
    p.add_argument("--max-side", type=int, default=0, help="skip images whose longer side is over this; 0: off")
    add_grid_args(p)
    add_rule_args(p, "ric")
    add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reports = {}
    try:
        grid, rule = grid_from_args(args), rule_from_args(args)
        for split in args.splits:
            coco = load_coco_instances(Path(args.ann_dir) / f"ric_instances_{split}.json", what="RIC file")
            report = reports[split] = SkipReport()
            records = ric_records(
                coco, grid=grid, rule=rule, report=report, caption_endings=args.caption_endings,
                max_side=args.max_side or None, image_root=args.image_root, progress=not args.no_progress,
            )
            write_split(records, Path(args.output_dir) / f"ric_instances_{split}.json", report, f"ric {split}")
    except INPUT_ERRORS + (pickle.UnpicklingError,) as err:
        return report_input_error(err)
    return finish(reports, args)


if __name__ == "__main__":
    sys.exit(main())
