"""REC metrics: accuracy at an IoU threshold, per sample (top-1) and the authors' best-of-N over echo keys.

Standard protocol: one predicted box per sample (the first object of the completion, keyed by sample); a sample
without a predicted object is a miss.  Paper protocol (the authors' ``eval/evaluation_scripts/eval_refcoco.py``;
docs/evaluation.md#metrics-and-protocols): predictions and ground truth are joined on the key
``"{image_id}_{label}"`` where the prediction's label is the sentence the model echoed; each key scores the *maximum*
IoU over all predicted objects sharing it, and a key without a prediction scores 0.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

from padt.evaluation.metrics.boxes import box_iou_xyxy


def accuracy_at(ious: Sequence[float] | np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of IoUs >= threshold (`(N,)` -> float; 0.0 for N = 0)."""
    ious = np.asarray(ious, dtype=np.float64).reshape(-1)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"IoU threshold must be in (0, 1], got {threshold}")
    return float((ious >= threshold).mean()) if ious.size else 0.0


def top1_box_ious(pred_boxes: Sequence[Sequence[float] | None], gt_boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of each sample's predicted box (None = no prediction -> 0) with its ground truth, `(N,)`; boxes xyxy."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"got {len(pred_boxes)} predicted boxes for {len(gt_boxes)} ground-truth boxes")
    out = np.zeros(len(gt_boxes), dtype=np.float64)
    for i, (p, g) in enumerate(zip(pred_boxes, gt_boxes)):
        if p is not None:
            out[i] = box_iou_xyxy([p], [g])[0, 0]
    return out


def best_iou_per_key(
    gt: Mapping[Hashable, object], preds: Iterable[tuple[Hashable, object]], iou_fn
) -> dict[Hashable, float]:
    """Best-of-N join (the authors' ``eval_refcoco.py``): for each ground-truth key, the max of
    `iou_fn(pred, gt[key])` over predictions with that key; 0.0 for keys without a prediction. Predictions whose key
    is not in `gt` are ignored (they are paraphrased echoes or hallucinated labels; the caller counts them)."""
    best = {key: 0.0 for key in gt}
    for key, pred in preds:
        if key in best:
            best[key] = max(best[key], float(iou_fn(pred, gt[key])))
    return best
