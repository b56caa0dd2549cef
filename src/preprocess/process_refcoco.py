"""REFER RefCOCO / RefCOCO+ / RefCOCOg -> REC/RES JSONL in the released PaDT-MLLM/RefCOCO format.

    python src/preprocess/process_refcoco.py --refer-root data/refer --output-dir data/padt/RefCOCO
    # reads  data/refer/{refcoco,refcoco+}/refs(unc).p, data/refer/refcocog/refs(umd).p, and each instances.json
    # writes data/padt/RefCOCO/{refcoco,refcoco+}_{train,val,testA,testB}.json, refcocog_{train,val,test}.json

One line per (ref, sentence). No randomness. See docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from padt.preprocess import DEFAULT_SPLIT_BY, DEFAULT_SPLITS, ReferDataset, SkipReport, refer_records
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refer-root", required=True, help="folder holding <dataset>/refs(<split-by>).p + instances.json")
    p.add_argument("--datasets", nargs="+", default=["refcoco", "refcoco+", "refcocog"])
    p.add_argument("--splits", nargs="+", default=None,
                   help="default: train val testA testB (refcoco, refcoco+), train val test (refcocog)")
    p.add_argument("--split-by", default=None, help="default: unc, or umd for refcocog")
    p.add_argument("--sentence-field", default="sent", help="sentence key: 'sent' (lower-case, default) or 'raw'")
    p.add_argument("--output-dir", required=True, help="writes <output-dir>/<dataset>_<split>.json")
    add_grid_args(p)
    add_rule_args(p, "refering")
    add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reports = {}
    try:
        grid, rule = grid_from_args(args), rule_from_args(args)
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
    except INPUT_ERRORS + (pickle.UnpicklingError,) as err:
        return report_input_error(err)
    return finish(reports, args)


if __name__ == "__main__":
    sys.exit(main())
