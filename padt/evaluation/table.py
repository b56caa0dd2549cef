"""Print the metrics of a run directory as one table per task.

    python -m padt.evaluation.table OUT_DIR      # reads OUT_DIR/metrics.json (or the <split>/metrics.json files)
    python -m padt.evaluation.table full=A/eval no_proj=B/eval    # several runs side by side, rows "name:split"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# the headline columns first, in this order; any other metric follows alphabetically
_PREFERRED = ["Acc@0.5", "paper_Acc@0.5", "cIoU", "gIoU", "paper_cIoU", "bbox_AP", "bbox_AP50", "bbox_AP75",
              "segm_AP", "segm_AP50", "segm_AP75", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE",
              "grounding_precision@0.5", "grounding_recall@0.5"]
# metrics shown as percentages (x100, one decimal, as in the paper's tables); others keep 3 decimals
_PERCENT_PREFIXES = ("Acc", "paper_Acc", "cIoU", "gIoU", "paper_cIoU", "bbox_", "segm_", "grounding_", "mean_IoU")


def _fmt(name: str, value) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if name.startswith(_PERCENT_PREFIXES):
        return f"{100 * value:.1f}"
    return f"{value:.3f}"


def _row(values: list[str], widths: list[int]) -> str:
    """Split and protocol left-aligned, numbers right-aligned."""
    return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))


def format_table(summary: dict, all_columns: bool = False) -> str:
    """Text tables (one per task) of ``{split: {task: {"protocol", "metrics", "info"}}}``.

    Only the headline metrics are shown unless `all_columns` (COCO APs/ARs by size, Bleu_1..3 ...)."""
    by_task: dict[str, list[tuple[str, dict]]] = {}
    for split, tasks in summary.items():
        for task, entry in tasks.items():
            by_task.setdefault(task, []).append((split, entry))
    blocks = []
    for task in sorted(by_task):
        rows = by_task[task]
        names = {k for _, e in rows for k in e.get("metrics", {})}
        cols = [c for c in _PREFERRED if c in names]
        if all_columns:
            cols += sorted(names - set(cols))
        header = ["split", "protocol", "n"] + cols
        body = [[split, e.get("protocol", ""), str(e.get("info", {}).get("n_samples", ""))]
                + [_fmt(c, e["metrics"][c]) if c in e.get("metrics", {}) else "-" for c in cols]
                for split, e in sorted(rows)]
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
        lines = [_row(r, widths) for r in [header] + body]
        blocks.append("\n".join([f"== {task.upper()} ==", *lines]))
    return "\n\n".join(blocks) if blocks else "(no metrics)"


def load_summary(out_dir: str | Path) -> dict:
    """``OUT_DIR/metrics.json``, or the split files when the summary was not written yet."""
    out_dir = Path(out_dir)
    top = out_dir / "metrics.json"
    if top.exists():
        return json.loads(top.read_text())
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out_dir.glob("*/metrics.json"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dirs", nargs="+", metavar="[NAME=]OUT_DIR",
                    help="--out directories of eval/evaluate.py; with several, rows are named NAME:split (NAME "
                         "defaults to the directory)")
    ap.add_argument("--all", action="store_true", help="every metric, not only the headline ones")
    args = ap.parse_args(argv)
    runs = [arg.split("=", 1) if "=" in arg else [arg, arg] for arg in args.out_dirs]
    missing = [d for _, d in runs if not Path(d).is_dir()]
    if missing:
        print(f"no such directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    if len(runs) == 1:
        summary = load_summary(runs[0][1])
    else:
        summary = {f"{name}:{split}": entry for name, d in runs for split, entry in load_summary(d).items()}
    print(format_table(summary, all_columns=args.all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
