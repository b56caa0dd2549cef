"""Box utilities: format conversion, area, IoU and generalized IoU (pairwise and elementwise).

Boxes are `(..., 4)` tensors, either `(cx, cy, w, h)` or `(x0, y0, x1, y1)` with `x1 >= x0`, `y1 >= y0`. The pairwise
functions return `(N, M)` matrices (DETR's `util/box_ops.py` API); the elementwise ones compare box i of `a` with box i
of `b` and return `(N,)` without building the `N x M` matrix (what a loss over matched pairs needs).

`torchvision.ops` is used when it imports; otherwise the pure-torch functions below compute the same values
(including torchvision's upcast of half-precision inputs to float32 before multiplying coordinates).
"""

from __future__ import annotations

import torch

try:  # optional: torchvision is not installed in CI, the pure-torch path is the reference there
    from torchvision import ops as _tv_ops
except ImportError:  # pragma: no cover - depends on the environment
    _tv_ops = None

__all__ = [
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "elementwise_box_iou",
    "elementwise_generalized_box_iou",
    "generalized_box_iou",
]


def _check_boxes(boxes: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(boxes):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., 4), got {type(boxes).__name__}")
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"{name} must have shape (..., 4), got {tuple(boxes.shape)}")


def _check_xyxy(boxes: torch.Tensor, name: str) -> None:
    _check_boxes(boxes, name)
    if boxes.numel() and not bool((boxes[..., 2:] >= boxes[..., :2]).all()):
        raise ValueError(f"{name} has degenerate boxes (x1 < x0 or y1 < y0); expected (x0, y0, x1, y1)")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Float16/bfloat16 -> float32 (torchvision's guard against overflow/rounding in coordinate products)."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """`(..., 4)` (cx, cy, w, h) -> `(..., 4)` (x0, y0, x1, y1)."""
    _check_boxes(boxes, "boxes")
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """`(..., 4)` (x0, y0, x1, y1) -> `(..., 4)` (cx, cy, w, h)."""
    _check_boxes(boxes, "boxes")
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _box_area_torch(boxes: torch.Tensor) -> torch.Tensor:
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of `(N, 4)` xyxy boxes -> `(N,)` (half precision is upcast to float32)."""
    _check_boxes(boxes, "boxes")
    if _tv_ops is not None and boxes.dim() == 2:
        return _tv_ops.box_area(boxes)
    return _box_area_torch(boxes)


def _intersection_union(
    boxes1: torch.Tensor, boxes2: torch.Tensor, pairwise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas: `(N, M)` when `pairwise`, else `(N,)` for aligned pairs."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    if pairwise:
        lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # N x M x 2
        rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # N x M x 2
        area1, area2 = area1[:, None], area2[None, :]
    else:
        lt = torch.max(boxes1[:, :2], boxes2[:, :2])  # N x 2
        rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])  # N x 2
    wh = _upcast(rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area1 + area2 - inter


def _enclosing_area(boxes1: torch.Tensor, boxes2: torch.Tensor, pairwise: bool) -> torch.Tensor:
    if pairwise:
        lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
        rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    else:
        lt = torch.min(boxes1[:, :2], boxes2[:, :2])
        rb = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    wh = _upcast(rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of `(N, 4)` and `(M, 4)` xyxy boxes.

    Returns:
        `(iou, union)`, both `(N, M)`.
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    inter, union = _intersection_union(boxes1, boxes2, pairwise=True)
    return inter / union, union


def _generalized_box_iou_torch(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    inter, union = _intersection_union(boxes1, boxes2, pairwise=True)
    iou = inter / union
    area = _enclosing_area(boxes1, boxes2, pairwise=True)
    return iou - (area - union) / area


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (https://giou.stanford.edu/) of `(N, 4)` and `(M, 4)` xyxy boxes -> `(N, M)`.

    Raises `ValueError` for degenerate boxes (x1 < x0 or y1 < y0), which would give meaningless values.
    """
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    if _tv_ops is not None:
        return _tv_ops.generalized_box_iou(boxes1, boxes2)
    return _generalized_box_iou_torch(boxes1, boxes2)


def _check_aligned(boxes1: torch.Tensor, boxes2: torch.Tensor) -> None:
    if boxes1.dim() != 2 or boxes1.shape != boxes2.shape:
        raise ValueError(
            f"elementwise box ops need two (N, 4) tensors of the same shape, got {tuple(boxes1.shape)} and "
            f"{tuple(boxes2.shape)}"
        )


def elementwise_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU of box i of `boxes1` with box i of `boxes2` (both `(N, 4)` xyxy): the diagonal of `box_iou`.

    Returns:
        `(iou, union)`, both `(N,)`.
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    _check_aligned(boxes1, boxes2)
    inter, union = _intersection_union(boxes1, boxes2, pairwise=False)
    return inter / union, union


def elementwise_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized IoU of aligned pairs (the diagonal of `generalized_box_iou`) without the `N x N` matrix.

    Args:
        boxes1, boxes2 (`torch.Tensor` of shape `(N, 4)`): xyxy boxes; pair i is (boxes1[i], boxes2[i]).
    Returns:
        `(giou, iou)`, both `(N,)`: the IoU comes for free and is logged as a metric.
    """
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    _check_aligned(boxes1, boxes2)
    inter, union = _intersection_union(boxes1, boxes2, pairwise=False)
    iou = inter / union
    area = _enclosing_area(boxes1, boxes2, pairwise=False)
    return iou - (area - union) / area, iou
