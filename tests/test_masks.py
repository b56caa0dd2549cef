"""padt.geometry.masks: RLE round trips, boxes and the foreground-cell rule."""

from fractions import Fraction

import numpy as np
import pytest
from rle_helpers import uncompressed_rle

from padt.geometry.masks import (
    FOREGROUND_RULES,
    box_mask,
    cell_coverage,
    foreground_cells,
    normalize_box_xywh,
    polygons_to_rle,
    rle_area,
    rle_decode,
    rle_encode,
    rle_to_bbox_xywh,
    segmentation_to_rle,
)

pytest.importorskip("cv2")
CELL = 28  # patch 14 x merge 2, passed explicitly everywhere


def _known_mask(extra_pixels: int) -> np.ndarray:
    """(56, 84) = a 2x3 grid of 28-px cells: cell (0, 1) full, plus ``extra_pixels`` in cell (1, 2)."""
    mask = np.zeros((56, 84), np.uint8)
    mask[0:28, 28:56] = 1
    for i in range(extra_pixels):  # row-major pixels inside cell (1, 2)
        mask[28 + i // 28, 56 + i % 28] = 1
    return mask


def test_rle_round_trip_and_text_counts():
    mask = _known_mask(28)
    rle = rle_encode(mask)
    assert list(rle) == ["size", "counts"] and rle["size"] == [56, 84] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(rle_decode(rle), mask)
    assert rle_area(rle) == 28 * 28 + 28
    assert rle_to_bbox_xywh(rle) == [28.0, 0.0, 56.0, 29.0]
    # uncompressed RLE (crowd style) decodes to the same mask as its compressed form
    runs = uncompressed_rle(mask)["counts"]
    assert segmentation_to_rle({"size": [56, 84], "counts": runs}, 56, 84) == rle


def test_polygon_rle_and_size_mismatch():
    rle = polygons_to_rle([[10, 10, 40, 10, 40, 30, 10, 30]], 56, 84)
    mask = rle_decode(rle)
    assert mask.shape == (56, 84) and 500 < mask.sum() < 700  # ~30 x 20 px rectangle
    with pytest.raises(ValueError, match="at least 3 points"):
        polygons_to_rle([[1, 2, 3, 4]], 56, 84)
    with pytest.raises(ValueError, match="does not match"):
        segmentation_to_rle(rle, 57, 84)


@pytest.mark.parametrize(
    "extra, task, expected",
    [
        (28, "ovd", [1, 5]),  # coverage exactly 1/28: uint8 mean 255/28 >= limit -> kept
        (28, "refering", [1]),  # ... but the RefCOCO rule is strict (>)
        (29, "refering", [1, 5]),
        (27, "ovd", [1]),
        (0, "ric", [1]),
    ],
)
def test_foreground_cells_threshold_rules(extra, task, expected):
    mask = _known_mask(extra)
    assert foreground_cells(mask, 2, 3, cell_size=CELL, **FOREGROUND_RULES[task].kwargs()) == expected


def test_foreground_cells_at_another_grid():
    # 2x upscale: the full cell (0, 1) becomes cells (0, 2), (0, 3), (1, 2), (1, 3) of a 4x6 grid; the blurred
    # one-pixel border stays far below 1/28 coverage in the neighbours.
    mask = _known_mask(0)
    cells = foreground_cells(mask, 4, 6, cell_size=CELL, **FOREGROUND_RULES["ovd"].kwargs())
    assert cells == [2, 3, 8, 9]
    cov = cell_coverage(mask, 4, 6, cell_size=CELL, resize_dtype="uint8")
    assert cov.shape == (4, 6) and cov[0, 2] > 250 and 0 < cov[0, 1] < 255 / 28
    # a smaller cell size is a different geometry, not a hidden 28
    assert foreground_cells(mask, 4, 6, cell_size=14, **FOREGROUND_RULES["ovd"].kwargs()) == [2, 3, 8, 9]


def test_resize_dtype_changes_near_threshold_cells():
    # 33 x 51 px -> grid 1 x 2 (a downscale). cv2 rounds the uint8 interpolation (mean 9.1033 < 255/28), the float32
    # resize does not (mean 9.1105 > 255/28): the COCO/RIC and RefCOCO rules disagree on this cell.
    mask = np.zeros((33, 51), np.uint8)
    mask[24:29, 43:49] = 1
    u8 = cell_coverage(mask, 1, 2, cell_size=CELL, resize_dtype="uint8")
    f32 = cell_coverage(mask, 1, 2, cell_size=CELL, resize_dtype="float32")
    assert u8[0, 1] == pytest.approx(9.1033163, abs=1e-6) and f32[0, 1] == pytest.approx(9.1104617, abs=1e-6)
    assert (u8 * CELL * CELL == np.round(u8 * CELL * CELL)).all()  # uint8 resize values are integers
    assert foreground_cells(mask, 1, 2, cell_size=CELL, **FOREGROUND_RULES["ovd"].kwargs()) == []
    assert foreground_cells(mask, 1, 2, cell_size=CELL, **FOREGROUND_RULES["refering"].kwargs()) == [1]


def test_foreground_cells_float_threshold_and_errors():
    mask = _known_mask(28)
    assert foreground_cells(mask, 2, 3, cell_size=CELL, threshold=0.5, inclusive=True, resize_dtype="uint8") == [1]
    assert foreground_cells(mask, 2, 3, cell_size=CELL, threshold=Fraction(0), inclusive=False,
                            resize_dtype="float32") == [1, 5]
    with pytest.raises(ValueError, match="resize_dtype"):
        foreground_cells(mask, 2, 3, cell_size=CELL, threshold=0.1, inclusive=True, resize_dtype="int16")
    with pytest.raises(ValueError, match="grid"):
        foreground_cells(mask, 0, 3, cell_size=CELL, threshold=0.1, inclusive=True, resize_dtype="uint8")
    with pytest.raises(ValueError, match="2-D"):
        foreground_cells(mask[None], 2, 3, cell_size=CELL, threshold=0.1, inclusive=True, resize_dtype="uint8")


def test_boxes():
    assert normalize_box_xywh([10, 20, 30, 40], 100, 200) == [0.1, 0.1, 0.4, 0.3]
    m = box_mask([1.5, 2.0, 4.0, 3.2], 5, 6)
    assert m.sum() == 3 * 2 and m[2, 1] == 1 and m[3, 3] == 1 and m[4, 3] == 0
    with pytest.raises(ValueError):
        normalize_box_xywh([0, 0, 1, 1], 0, 10)
