"""One data file ("split") end to end, and the run summary.

Layout of ``--out DIR``::

    DIR/<split>/run.json                  what produced the predictions (model, max_new_tokens, data file)
    DIR/<split>/predictions.rank{r}.jsonl one line per sample, appended as generated (resume: see records.py)
    DIR/<split>/metrics.json              {task: {"protocol", "metrics", "info"}}: tasks evaluated on these predictions
    DIR/metrics.json                      {split: <split>/metrics.json} for every split under DIR

REC and RES read the same RefCOCO files and the same predictions: evaluating ``--task res`` after ``--task rec`` into
the same ``--out`` generates nothing and adds the RES entry to ``metrics.json``. Timings are printed, never written,
so an interrupted and resumed run writes the same ``metrics.json`` as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from padt.evaluation import distributed
from padt.evaluation.data import load_samples
from padt.evaluation.records import PredictionStore, rank_files, read_predictions
from padt.evaluation.runner import run_inference
from padt.evaluation.tasks import PROTOCOLS, task_metrics
from padt.io import write_json

SUMMARY_FILE = "metrics.json"
JSON_STYLE = {"indent": 1, "sort_keys": True}  # of run.json and the metrics.json files


class MissingPredictionsError(RuntimeError):
    """Metrics were asked for while some samples have no prediction yet."""


@dataclass
class EvalOptions:
    """Everything but the model: what to evaluate and how."""

    task: str
    protocol: str = "standard"
    batch_size: int = 8
    max_new_tokens: int = 1024
    annotations: str | None = None
    limit: int | None = None
    caption_metrics: Sequence[str] | None = None
    tokenizer: str = "auto"
    progress: bool = True
    overwrite: bool = False
    verbose: bool = False
    extra_meta: dict = field(default_factory=dict)


def split_name(path: str | os.PathLike) -> str:
    """``.../refcoco_val.json`` -> ``refcoco_val``."""
    name = Path(path).name
    for ext in (".jsonl", ".json"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _check_run_meta(split_dir: Path, meta: dict, write: bool) -> None:
    """Refuse to mix predictions of different runs in one directory."""
    path = split_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff and rank_files(split_dir):
            detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{split_dir} holds predictions of a different run ({detail}); use another --out or "
                             "--overwrite to discard them")
    if write:
        write_json(meta, path, **JSON_STYLE)


def evaluate_split(
    predictor_factory: Callable[[], object] | None,
    data_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: EvalOptions,
    model_id: str | None = None,
    dist: distributed.DistInfo | None = None,
) -> dict | None:
    """Predict (resuming) and score one data file. Returns the task's metrics entry on rank 0, None elsewhere.

    Args:
        predictor_factory: returns the predictor (called only when this rank has pending samples); None =
            metrics only (every sample must already have a prediction).
        model_id: recorded in run.json; a directory with predictions of another model is refused.
    """
    if options.protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {options.protocol!r}")
    dist = dist or distributed.DistInfo()
    samples = load_samples(data_path, images_dir, options.task, options.limit)
    split_dir = Path(out_dir) / split_name(data_path)
    if options.overwrite and dist.is_main and split_dir.exists():
        for path in rank_files(split_dir) + [split_dir / "run.json", split_dir / SUMMARY_FILE]:
            path.unlink(missing_ok=True)
    distributed.barrier(dist)
    store = PredictionStore(split_dir, dist.rank)
    if predictor_factory is not None:
        meta = {"model": model_id, "max_new_tokens": options.max_new_tokens, "data": str(Path(data_path).resolve()),
                "samples": "one per image" if options.task == "ric" else "one per record", **options.extra_meta}
        _check_run_meta(split_dir, meta, write=dist.is_main)
        stats = run_inference(predictor_factory, samples, store, options.batch_size, dist.rank, dist.world_size,
                              options.progress)
        print(f"[padt.eval] {split_name(data_path)} rank {dist.rank}: {stats.generated} generated, "
              f"{stats.skipped} already done (of {stats.shard_size})", file=sys.stderr)
    distributed.barrier(dist)
    if not dist.is_main:
        return None
    preds = read_predictions(split_dir)
    missing = [s.index for s in samples if s.index not in preds]
    if missing:
        raise MissingPredictionsError(f"{len(missing)} of {len(samples)} samples of {data_path} have no prediction in "
                           f"{split_dir} (first: {missing[:5]}); run with --model to generate them (it resumes)")
    wanted = {s.index for s in samples}
    preds = {i: r for i, r in preds.items() if i in wanted}
    result = task_metrics(options.task, samples, preds, options.protocol, annotations=options.annotations,
                          verbose=options.verbose, caption_metrics=options.caption_metrics,
                          tokenizer=options.tokenizer)
    entry = {"protocol": options.protocol, **result}
    path = split_dir / SUMMARY_FILE
    table = json.loads(path.read_text()) if path.exists() else {}
    table[options.task] = entry
    write_json(table, path, **JSON_STYLE)
    return entry


def write_summary(out_dir: str | os.PathLike) -> dict:
    """Collect every ``<split>/metrics.json`` under `out_dir` into ``out_dir/metrics.json``; returns it."""
    out_dir = Path(out_dir)
    summary = {}
    for path in sorted(out_dir.glob(f"*/{SUMMARY_FILE}")):
        summary[path.parent.name] = json.loads(path.read_text())
    write_json(summary, out_dir / SUMMARY_FILE, **JSON_STYLE)
    return summary

