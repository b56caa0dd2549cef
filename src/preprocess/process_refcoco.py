"""REFER RefCOCO / RefCOCO+ / RefCOCOg -> REC/RES JSONL in the released PaDT-MLLM/RefCOCO format.

    python src/preprocess/process_refcoco.py --refer-root data/refer --output-dir data/padt/RefCOCO
    # reads  data/refer/{refcoco,refcoco+}/refs(unc).p, data/refer/refcocog/refs(umd).p, and each instances.json
    # writes data/padt/RefCOCO/{refcoco,refcoco+}_{train,val,testA,testB}.json, refcocog_{train,val,test}.json

One line per (ref, sentence). No randomness. See docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from padt.geometry.masks import ForegroundRule
from padt.preprocess import DEFAULT_SPLIT_BY, DEFAULT_SPLITS, GridSpec, ReferDataset, SkipReport, refer_records
from padt.preprocess.cli import run_script, script_parser, write_split


def add_own_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refer-root", required=True, help="folder holding <dataset>/refs(<split-by>).p + instances.json")
    p.add_argument("--datasets", nargs="+", default=["refcoco", "refcoco+", "refcocog"])
    p.add_argument("--splits", nargs="+", default=None,
                   help="default: train val testA testB (refcoco, refcoco+), train val test (refcocog)")
    p.add_argument("--split-by", default=None, help="default: unc, or umd for refcocog")
    p.add_argument("--sentence-field", default="sent", help="sentence key: 'sent' (lower-case, default) or 'raw'")
    p.add_argument("--output-dir", required=True, help="writes <output-dir>/<dataset>_<split>.json")


def build_parser() -> argparse.ArgumentParser:
    return script_parser(__doc__, add_own_args, "refering")


def convert(args: argparse.Namespace, grid: GridSpec, rule: ForegroundRule, reports: dict[str, SkipReport]) -> None:
    for dataset in args.datasets:
        split_by = args.split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
        refer = ReferDataset.load(args.refer_root, dataset, split_by)
        for split in args.splits or DEFAULT_SPLITS.get(dataset, refer.split_names()):
            report = reports[f"{dataset}_{split}"] = SkipReport()
            records = refer_records(
                refer, split, grid=grid, rule=rule, report=report, sentence_field=args.sentence_field,
                image_root=args.image_root, progress=not args.no_progress,
            )
            write_split(records, Path(args.output_dir) / f"{dataset}_{split}.json", report, f"{dataset} {split}")


def main(argv: list[str] | None = None) -> int:
    return run_script(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
