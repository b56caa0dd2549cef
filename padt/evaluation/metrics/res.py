"""RES metrics on full-resolution masks (COCO RLEs).

- ``cIoU`` = sum of intersections / sum of unions over all samples (the RefCOCO segmentation convention; large objects
  weigh more);
- ``gIoU`` = mean of the per-sample IoUs;
- the authors' "cIoU" (``eval/evaluation_scripts/eval_refcoco.py``; docs/evaluation.md#metrics-and-protocols) is
  neither: it is the mean over echo keys of the *best* mask IoU among the predictions sharing the key
  (``padt.evaluation.metrics.rec.best_iou_per_key`` with :func:`mask_iou`).

A sample without a predicted mask has intersection 0 and union = the ground-truth area. When both masks are empty the
IoU is defined as 1 (nothing to find, nothing found).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from padt.geometry.masks import as_bytes_rle, mask_api


def mask_intersection_union(pred_rle: dict | None, gt_rle: dict) -> tuple[int, int]:
    """(intersection, union) pixel counts of a predicted RLE (None = no prediction) and a ground-truth RLE."""
    api = mask_api()
    gt = as_bytes_rle(gt_rle)
    gt_area = int(api.area(gt))
    if pred_rle is None:
        return 0, gt_area
    pred = as_bytes_rle(pred_rle)
    if list(pred["size"]) != list(gt["size"]):
        raise ValueError(f"predicted mask size {list(pred['size'])} differs from the ground truth's "
                         f"{list(gt['size'])}; both must be at the original image size (H, W)")
    inter = int(api.area(api.merge([pred, gt], intersect=True)))
    return inter, int(api.area(pred)) + gt_area - inter


def mask_iou(pred_rle: dict | None, gt_rle: dict) -> float:
    """IoU of two RLE masks (1.0 when both are empty, 0.0 when there is no prediction and the GT is not empty)."""
    inter, union = mask_intersection_union(pred_rle, gt_rle)
    return inter / union if union else 1.0


def _float_pairs(intersections: Sequence[int], unions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample intersections and unions as float64 arrays of one shape `(N,)`; ValueError if the shapes differ."""
    inter = np.asarray(intersections, dtype=np.float64)
    union = np.asarray(unions, dtype=np.float64)
    if inter.shape != union.shape:
        raise ValueError(f"intersections {inter.shape} and unions {union.shape} must have the same shape")
    return inter, union


def ciou(intersections: Sequence[int], unions: Sequence[int]) -> float:
    """Cumulative IoU: sum(I) / sum(U) over samples (`(N,)` each; 0.0 when N = 0, 1.0 when every union is 0)."""
    inter, union = _float_pairs(intersections, unions)
    if inter.size == 0:
        return 0.0
    return float(inter.sum() / union.sum()) if union.sum() > 0 else 1.0


def giou(intersections: Sequence[int], unions: Sequence[int]) -> float:
    """Mean of the per-sample IoUs I/U (a sample with U = 0 has IoU 1); 0.0 when N = 0."""
    inter, union = _float_pairs(intersections, unions)
    if inter.size == 0:
        return 0.0
    ious = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
    return float(ious.mean())
