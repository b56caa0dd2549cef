"""One annotation -> one JSONL object: foreground cells, normalised box, crowd flag, area, RLE and label."""

from __future__ import annotations

from typing import Any

from padt.geometry.masks import (
    ForegroundRule,
    box_mask,
    clean_polygons,
    foreground_cells,
    normalize_box_xywh,
    rle_area,
    rle_decode,
    rle_to_bbox_xywh,
    segmentation_to_rle,
    xywh_to_xyxy,
)
from padt.preprocess.common import GridSpec
from padt.preprocess.skips import SkipReport

NO_FOREGROUND = "no foreground cell at the merged grid"
NO_GEOMETRY = "annotation has neither bbox nor segmentation"
BAD_BBOX = "malformed bbox"
BAD_SEGMENTATION = "malformed segmentation"
RLE_SIZE_MISMATCH = "segmentation RLE size differs from the image size"
NOTE_BOX_MASK = "object without segmentation: box-shaped cells, no rle"
NOTE_DEGENERATE_POLYGON = "degenerate polygon part (< 3 points) ignored"


def make_object(
    patches: list[int], bbox: list[float], iscrowd: int, area: float, rle: dict | None, label: str
) -> dict:
    """Object fields in the released order; ``rle`` is omitted when there is no segmentation."""
    obj: dict[str, Any] = {"patches": patches, "bbox": bbox, "iscrowd": iscrowd, "area": area}
    if rle is not None:
        obj["rle"] = rle
    obj["label"] = label
    return obj


def _has_segmentation(seg: Any) -> bool:
    return bool(seg) if isinstance(seg, (list, tuple, dict)) else seg is not None


def _valid_box(box: Any) -> bool:
    return (
        isinstance(box, (list, tuple)) and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        and box[2] >= 0 and box[3] >= 0
    )


def object_from_geometry(
    *,
    segmentation: Any,
    bbox_xywh: Any,
    height: int,
    width: int,
    grid_hw: tuple[int, int],
    grid: GridSpec,
    rule: ForegroundRule,
    label: str,
    iscrowd: int = 0,
    area: float | None = None,
    report: SkipReport | None = None,
) -> tuple[dict | None, str | None]:
    """Build an object from a COCO-style segmentation and/or [x, y, w, h] box at an image of size (H, W).

    Returns (object, None) or (None, reason) when the object cannot be used; the caller decides whether that drops
    the object or skips the whole record. Repairs are noted in ``report``.
    """
    rle = None
    if _has_segmentation(segmentation):
        if isinstance(segmentation, (list, tuple)):
            _, n_bad = clean_polygons(segmentation)
            if n_bad and report is not None:
                report.note(NOTE_DEGENERATE_POLYGON, n_bad)
        try:
            rle = segmentation_to_rle(segmentation, height, width)
        except (ValueError, TypeError) as err:
            return None, RLE_SIZE_MISMATCH if "does not match" in str(err) else BAD_SEGMENTATION
    if bbox_xywh is None:
        if rle is None:
            return None, NO_GEOMETRY
        bbox_xywh = rle_to_bbox_xywh(rle)
    elif not _valid_box(bbox_xywh):
        return None, BAD_BBOX
    if rle is not None:
        mask = rle_decode(rle)
    else:
        mask = box_mask(xywh_to_xyxy(bbox_xywh), height, width)
        if report is not None:
            report.note(NOTE_BOX_MASK)
    patches = foreground_cells(mask, grid_hw[0], grid_hw[1], cell_size=grid.cell_size, **rule.kwargs())
    if not patches:
        return None, NO_FOREGROUND
    if area is None:
        area = float(rle_area(rle)) if rle is not None else float(bbox_xywh[2]) * float(bbox_xywh[3])
    obj = make_object(patches, normalize_box_xywh(bbox_xywh, width, height), int(iscrowd), area, rle, label)
    return obj, None


def object_from_annotation(
    ann: dict, *, height: int, width: int, grid_hw: tuple[int, int], grid: GridSpec, rule: ForegroundRule,
    label: str, report: SkipReport | None = None,
) -> tuple[dict | None, str | None]:
    """A COCO annotation dict (``segmentation``, ``bbox``, ``iscrowd``, ``area``) -> (object, None) or
    (None, reason)."""
    return object_from_geometry(
        segmentation=ann.get("segmentation"), bbox_xywh=ann.get("bbox"), height=height, width=width,
        grid_hw=grid_hw, grid=grid, rule=rule, label=label, iscrowd=ann.get("iscrowd", 0),
        area=ann.get("area"), report=report,
    )
