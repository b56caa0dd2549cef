"""Mask and box helpers shared by preprocessing, the training-data reader and evaluation.

Conventions:
  * a *mask* is a 2-D array (H, W) at the original image resolution; any non-zero value is foreground;
  * an *RLE* is a COCO run-length encoding ``{"size": [H, W], "counts": str}`` (compressed counts as text,
    which is what the JSONL files store);
  * a *merged grid* is the grid of visual tokens after the vision tower's spatial merge: one cell covers
    ``cell_size = patch_size * merge_size`` resized pixels (28 for Qwen2.5-VL), cells are indexed
    row-major, ``index = row * grid_w + col``; which grid an image gets is `padt.geometry.grids`.

RLE work goes through pycocotools.  The foreground-cell rule resizes with OpenCV (bilinear), because the released
``patches`` were computed that way and cv2's fixed-point uint8 arithmetic is what makes near-threshold cells agree
bit for bit; cv2 is imported lazily so that the rest of this module works without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

_RESIZE_DTYPES = {"uint8": np.uint8, "float32": np.float32}


# --------------------------------------------------------------------------- RLE / polygons
def mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError as err:  # pragma: no cover - pycocotools is a dependency of the eval/train extras
        raise ImportError("padt.geometry.masks needs pycocotools for RLE work: pip install pycocotools") from err
    return mask_api


def as_text_rle(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def as_bytes_rle(rle: dict) -> dict:
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise TypeError(f"expected a COCO RLE dict with 'size' and 'counts', got {type(rle).__name__}: {rle!r:.80}")
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        h, w = rle["size"]
        return mask_api().frPyObjects(rle, int(h), int(w))
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def rle_encode(mask: np.ndarray) -> dict:
    """Encode a binary mask (H, W) as a compressed COCO RLE with text counts."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask (H, W), got shape {mask.shape}")
    return as_text_rle(mask_api().encode(np.asfortranarray((mask != 0).astype(np.uint8))))


def rle_decode(rle: dict) -> np.ndarray:
    """Decode a COCO RLE (compressed text/bytes counts, or uncompressed list counts) to a uint8 mask (H, W) of 0/1."""
    return mask_api().decode(as_bytes_rle(rle))


def rle_area(rle: dict) -> int:
    """Number of foreground pixels of an RLE."""
    return int(mask_api().area(as_bytes_rle(rle)))


def rle_to_bbox_xywh(rle: dict) -> list[float]:
    """Tight box [x, y, w, h] (pixels) of an RLE's foreground; all zeros for an empty mask."""
    return [float(v) for v in mask_api().toBbox(as_bytes_rle(rle))]


def polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> dict:
    """Rasterise COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` and OR the parts into one RLE.

    Raises ValueError if no part has at least 3 points (6 numbers); use :func:`clean_polygons` first to drop
    degenerate parts explicitly.
    """
    parts = [list(map(float, p)) for p in polygons]
    if not parts or any(len(p) < 6 or len(p) % 2 for p in parts):
        raise ValueError(
            "each polygon needs an even number of coordinates and at least 3 points; "
            f"got part lengths {[len(p) for p in parts]}"
        )
    api = mask_api()
    return as_text_rle(api.merge(api.frPyObjects(parts, int(height), int(width))))


def clean_polygons(polygons: Sequence[Sequence[float]]) -> tuple[list[list[float]], int]:
    """Split polygon parts into usable ones (>= 3 points, even length) and a count of degenerate ones."""
    good = [list(p) for p in polygons if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]
    return good, len(polygons) - len(good)


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """COCO ``segmentation`` (polygon list, uncompressed RLE or compressed RLE) -> compressed text RLE.

    Raises ValueError for an empty or unusable segmentation and for an RLE whose size is not (height, width).
    """
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise ValueError(f"RLE segmentation needs 'counts' and 'size', got keys {sorted(segmentation)}")
        size = [int(v) for v in segmentation["size"]]
        if size != [int(height), int(width)]:
            raise ValueError(f"RLE size {size} does not match the image size {[int(height), int(width)]}")
        return as_text_rle(as_bytes_rle(segmentation))
    if isinstance(segmentation, (list, tuple)):
        good, _ = clean_polygons(segmentation)
        if not good:
            raise ValueError("segmentation has no polygon with at least 3 points")
        return polygons_to_rle(good, height, width)
    raise ValueError(f"unsupported segmentation type {type(segmentation).__name__}")


def box_mask(box_xyxy: Sequence[float], height: int, width: int) -> np.ndarray:
    """Box-shaped mask (H, W) uint8: pixels whose square overlaps [x1, x2) x [y1, y2) (floor/ceil), clipped."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    c0, r0 = max(0, math.floor(x1)), max(0, math.floor(y1))
    c1, r1 = min(int(width), math.ceil(x2)), min(int(height), math.ceil(y2))
    mask = np.zeros((int(height), int(width)), dtype=np.uint8)
    if c1 > c0 and r1 > r0:
        mask[r0:r1, c0:c1] = 1
    return mask


# --------------------------------------------------------------------------- boxes
def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """[x, y, w, h] -> [x1, y1, x2, y2] (same units)."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def normalize_box_xyxy(box_xyxy: Sequence[float], width: int, height: int) -> list[float]:
    """Pixel [x1, y1, x2, y2] -> [x1/W, y1/H, x2/W, y2/H] (not clipped, not rounded)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width} height={height}")
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return [x1 / width, y1 / height, x2 / width, y2 / height]


def normalize_box_xywh(box_xywh: Sequence[float], width: int, height: int) -> list[float]:
    """COCO pixel [x, y, w, h] -> normalised [x1, y1, x2, y2], as stored in the JSONL ``bbox`` field."""
    return normalize_box_xyxy(xywh_to_xyxy(box_xywh), width, height)


# --------------------------------------------------------------------------- foreground cells
@dataclass(frozen=True)
class ForegroundRule:
    """When a merged cell counts as foreground for an object.

    The mask x 255 is resized (cv2 bilinear, in ``resize_dtype``) to (grid_h * cell, grid_w * cell), averaged per
    cell, and compared with ``threshold * 255`` (``>=`` if ``inclusive`` else ``>``). ``threshold`` is a coverage
    fraction; pass a ``Fraction`` for an exact limit (1/28 -> 255/28 exactly, as in the released data).
    """

    threshold: Fraction | float
    inclusive: bool
    resize_dtype: str

    def kwargs(self) -> dict:
        return {"threshold": self.threshold, "inclusive": self.inclusive, "resize_dtype": self.resize_dtype}


# The rules of the authors' three preprocessing scripts, by record ``task``: COCO and RIC resize a uint8 mask (cv2
# rounds) and keep cells with mean >= 255/28; RefCOCO resizes a float32 mask and keeps mean > 255/28.
FOREGROUND_RULES: dict[str, ForegroundRule] = {
    "ovd": ForegroundRule(Fraction(1, 28), True, "uint8"),
    "ric": ForegroundRule(Fraction(1, 28), True, "uint8"),
    "refering": ForegroundRule(Fraction(1, 28), False, "float32"),
}


def _cv2():
    try:
        import cv2
    except ImportError as err:
        raise ImportError(
            "foreground_cells needs OpenCV for the bilinear resize that the released data used: "
            "pip install opencv-python-headless"
        ) from err
    return cv2


def cell_coverage(mask: np.ndarray, grid_h: int, grid_w: int, *, cell_size: int, resize_dtype: str) -> np.ndarray:
    """Mean of the resized mask x 255 per merged cell, (grid_h, grid_w) float64 in [0, 255]."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array (H, W), got shape {mask.shape}")
    if grid_h < 1 or grid_w < 1 or cell_size < 1:
        raise ValueError(f"grid and cell size must be >= 1, got grid {grid_h}x{grid_w}, cell_size {cell_size}")
    if resize_dtype not in _RESIZE_DTYPES:
        raise ValueError(f"resize_dtype must be one of {sorted(_RESIZE_DTYPES)}, got {resize_dtype!r}")
    scaled = (mask != 0).astype(_RESIZE_DTYPES[resize_dtype]) * _RESIZE_DTYPES[resize_dtype](255)
    out_h, out_w = grid_h * cell_size, grid_w * cell_size
    resized = _cv2().resize(scaled, (out_w, out_h), interpolation=_cv2().INTER_LINEAR)
    # rows of cells first (contiguous reduction), then columns: same sums as .sum(axis=(1, 3)), about 2x faster
    rows = resized.reshape(grid_h, cell_size, out_w).sum(axis=1, dtype=np.float64)
    sums = rows.reshape(grid_h, grid_w, cell_size).sum(axis=2)
    return sums / float(cell_size * cell_size)


def foreground_cells(
    mask: np.ndarray,
    grid_h: int,
    grid_w: int,
    *,
    cell_size: int,
    threshold: Fraction | float,
    inclusive: bool,
    resize_dtype: str,
) -> list[int]:
    """Row-major indices of the merged cells where ``mask`` (H, W) is foreground, at any merged grid.

    Args:
        mask: (H, W) at original resolution, non-zero = object (e.g. ``rle_decode(obj["rle"])``).
        grid_h, grid_w: merged grid, e.g. from `padt.geometry.grids.merged_grid_for_image` or ``rounded_grid``.
        cell_size: resized pixels per merged cell (patch_size * merge_size).
        threshold, inclusive, resize_dtype: see :class:`ForegroundRule` / ``FOREGROUND_RULES[task].kwargs()``.
    Returns:
        Sorted list of ints in [0, grid_h * grid_w).
    """
    limit = float(Fraction(threshold) * 255) if isinstance(threshold, (Fraction, int)) else float(threshold) * 255.0
    means = cell_coverage(mask, grid_h, grid_w, cell_size=cell_size, resize_dtype=resize_dtype)
    keep = means >= limit if inclusive else means > limit
    return [int(i) for i in np.flatnonzero(keep.reshape(-1))]
