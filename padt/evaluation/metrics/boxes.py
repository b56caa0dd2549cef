"""Box helpers for evaluation: IoU and the authors' pixel-box convention for COCO-style results
(docs/evaluation.md#metrics-and-protocols)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def box_iou_xyxy(boxes_a: np.ndarray | Sequence, boxes_b: np.ndarray | Sequence) -> np.ndarray:
    """Pairwise IoU of two sets of (x1, y1, x2, y2) boxes in the same units.

    Args:
        boxes_a: `(N, 4)`; boxes_b: `(M, 4)`. Degenerate boxes (x2 < x1) count as empty.
    Returns:
        `(N, M)` float64 IoU; a pair whose union is empty has IoU 0.
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def authors_box_xywh(box_cxcywh: Sequence[float], width: int, height: int) -> list[int]:
    """The authors' result box (``infer_dataset`` in ``eval/evaluation_scripts/utils.py``): normalised
    (cx, cy, w, h) -> integer pixel [x, y, w, h].

    x = max(cx - w/2, 0), y = max(cy - h/2, 0); w and h are clipped at 1 (x + w is *not* clipped); then every value is
    multiplied by the original width / height and rounded (Python round, half to even).
    """
    if len(box_cxcywh) != 4:
        raise ValueError(f"box_cxcywh must have 4 values (cx, cy, w, h), got {list(box_cxcywh)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width} height={height}")
    cx, cy, w, h = (float(v) for v in box_cxcywh)
    x, y = max(cx - w / 2, 0.0), max(cy - h / 2, 0.0)
    w, h = min(w, 1.0), min(h, 1.0)
    return [round(x * width), round(y * height), round(w * width), round(h * height)]


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """[x, y, w, h] -> [x1, y1, x2, y2]."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def normalized_xyxy_to_pixels(box: Sequence[float], width: int, height: int) -> list[float]:
    """A JSONL `bbox` (x1, y1, x2, y2 normalised by the original image) -> float pixels (x1, y1, x2, y2)."""
    if len(box) != 4:
        raise ValueError(f"bbox must have 4 values (x1, y1, x2, y2), got {list(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1 * width, y1 * height, x2 * width, y2 * height]
