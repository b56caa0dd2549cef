"""Grounding of a caption's referenced objects: one-to-one box matching against the annotated objects.

A generated caption names its own objects, so there is no given pairing with the ground-truth objects. Each
predicted (referenced) object is paired with at most one ground-truth object and vice versa, greedily by decreasing
IoU (ties broken by order); a pair counts when its IoU >= the threshold. Then

- precision = matched predicted objects / predicted objects ("fraction of referenced objects whose predicted box has
  IoU >= 0.5 with its ground truth"),
- recall = matched ground-truth objects / ground-truth objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from padt.evaluation.metrics.boxes import box_iou_xyxy


def greedy_match(iou: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int]]:
    """One-to-one pairs (pred i, gt j) with IoU >= threshold, greedily by decreasing IoU.

    Args:
        iou: `(P, G)` IoU matrix.
    Returns:
        list of (i, j), sorted by i.
    """
    iou = np.asarray(iou, dtype=np.float64)
    if iou.ndim != 2:
        raise ValueError(f"iou must be a (P, G) matrix, got shape {iou.shape}")
    pairs, used_p, used_g = [], set(), set()
    order = np.argsort(-iou, axis=None, kind="stable")
    for flat in order:
        i, j = divmod(int(flat), iou.shape[1])
        if iou[i, j] < threshold:
            break
        if i in used_p or j in used_g:
            continue
        pairs.append((i, j))
        used_p.add(i)
        used_g.add(j)
    return sorted(pairs)


@dataclass
class GroundingCounts:
    """Running counts over samples; `precision` / `recall` are 0.0 when their denominator is 0."""

    matched: int = 0
    predicted: int = 0
    annotated: int = 0

    def add(self, pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]],
            threshold: float = 0.5) -> int:
        """Match one sample's predicted boxes `(P, 4)` against its ground truth `(G, 4)` (xyxy, same units);
        returns the number of matches."""
        n = 0
        if len(pred_boxes) and len(gt_boxes):
            n = len(greedy_match(box_iou_xyxy(pred_boxes, gt_boxes), threshold))
        self.matched += n
        self.predicted += len(pred_boxes)
        self.annotated += len(gt_boxes)
        return n

    @property
    def precision(self) -> float:
        return self.matched / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.matched / self.annotated if self.annotated else 0.0
