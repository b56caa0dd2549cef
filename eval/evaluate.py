"""Evaluate a PaDT checkpoint on REC / RES / OVD / RIC data files (the released JSONL records) and write metrics.json.

    python eval/evaluate.py --model PaDT-MLLM/PaDT_Pro_3B --task rec --data refcoco_val.json refcoco_testA.json \
        --images coco/train2014 --out outputs/eval/pro3b
    python eval/evaluate.py --model CKPT --task res --data refcoco_val.json --images coco/train2014 \
        --out outputs/eval/pro3b --protocol paper          # reuses the REC predictions, adds the paper's numbers
    python eval/evaluate.py --model CKPT --task ovd --data instances_val2017.json --images coco/val2017 \
        --annotations coco/annotations/instances_val2017.json --out outputs/eval/pro3b
    torchrun --nproc_per_node 4 eval/evaluate.py --model CKPT --task ric --data ric_instances_val2017.json \
        --images coco/val2017 --out outputs/eval/pro3b     # any number of processes; no DeepSpeed

Predictions are appended to OUT/<split>/predictions.rank{r}.jsonl as they are made: run the same command again after
an interruption and it continues where it stopped. --metrics-only recomputes metrics from existing predictions.
Print the table of a run with `python -m padt.evaluation.table OUT`. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from padt.evaluation import distributed
from padt.evaluation.data import TASKS
from padt.evaluation.metrics.caption import ALL_METRICS, DEFAULT_METRICS
from padt.evaluation.pipeline import EvalOptions, MissingPredictionsError, evaluate_split, split_name, write_summary
from padt.evaluation.table import format_table
from padt.evaluation.tasks import PROTOCOLS

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory or hub id (not needed with --metrics-only)")
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--data", required=True, nargs="+", help="one or more JSONL data files (each is a split)")
    ap.add_argument("--images", required=True, help="directory holding the records' 'image' files")
    ap.add_argument("--out", required=True, help="output directory (one sub-directory per split)")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="standard",
                    help="standard: top-1 per sample; paper: also the authors' best-of-N echo-keyed numbers")
    ap.add_argument("--batch-size", type=int, default=8, help="samples per generate call (left padding)")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--distinct-vrts", action="store_true",
                    help="forbid repeating a VRT within one object's run while generating "
                         "(padt.processing.generation; off = the authors' greedy decoding)")
    ap.add_argument("--annotations", help="ovd: official COCO annotations (else the records are the ground truth)")
    ap.add_argument("--limit", type=int, help="evaluate only the first N samples of each split")
    ap.add_argument("--caption-metrics", nargs="+", choices=ALL_METRICS, default=list(DEFAULT_METRICS),
                    help="ric: caption metrics (METEOR and SPICE need Java and are skipped without it)")
    ap.add_argument("--caption-tokenizer", choices=("auto", "ptb", "python"), default="auto",
                    help="ric: PTB tokenizer through Java (auto: when available), or the Python approximation")
    ap.add_argument("--device", help="cpu, cuda ... (default: cuda:LOCAL_RANK if available, else cpu)")
    ap.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--metrics-only", action="store_true", help="score existing predictions, do not load the model")
    ap.add_argument("--overwrite", action="store_true", help="discard existing predictions of these splits")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--verbose", action="store_true", help="print COCOeval's tables")
    return ap


def _predictor_factory(args: argparse.Namespace, dist: distributed.DistInfo):
    def load():
        import torch

        from padt.inference.predictor import PaDTPredictor

        device = args.device or (f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        return PaDTPredictor.from_pretrained(args.model, device=device, dtype=dtype,
                                             max_new_tokens=args.max_new_tokens, distinct_vrts=args.distinct_vrts)

    return load


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.metrics_only and not args.model:
        print("--model is required (or pass --metrics-only to score existing predictions)", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        print("--batch-size, --max-new-tokens and --limit must be >= 1", file=sys.stderr)
        return 2
    for path in args.data + ([args.annotations] if args.annotations else []):
        if not Path(path).is_file():
            print(f"file not found: {path}", file=sys.stderr)
            return 2
    if not Path(args.images).is_dir():
        print(f"--images directory not found: {args.images}", file=sys.stderr)
        return 2
    names = [split_name(p) for p in args.data]
    if len(set(names)) != len(names):
        print(f"two --data files share a split name ({names}); their outputs would collide", file=sys.stderr)
        return 2

    dist = distributed.dist_info()
    distributed.init(dist)
    options = EvalOptions(
        task=args.task, protocol=args.protocol, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        annotations=args.annotations, limit=args.limit, caption_metrics=args.caption_metrics,
        tokenizer=args.caption_tokenizer, progress=not args.no_progress, overwrite=args.overwrite,
        verbose=args.verbose, extra_meta={"distinct_vrts": True} if args.distinct_vrts else {},
    )
    factory = None if args.metrics_only else _predictor_factory(args, dist)
    try:
        for data in args.data:
            entry = evaluate_split(factory, data, args.images, args.out, options, model_id=args.model, dist=dist)
            if entry is not None:
                for note in entry["info"].get("notes", []) + list(entry["info"].get("skipped", {}).values()):
                    print(f"[padt.eval] note: {note}", file=sys.stderr)
                print(f"{split_name(data)} {args.task}: {json.dumps(entry['metrics'])}")
    except (ValueError, FileNotFoundError, MissingPredictionsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown(dist)
    if dist.is_main:
        summary = write_summary(args.out)
        print(format_table({k: v for k, v in summary.items() if k in names}))
        print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
