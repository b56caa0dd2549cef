"""Image geometry for training data: tiny-image upscaling, foreground cells, gt masks.

The released JSONL stores each object's ``patches`` on the rounded 28-px grid of the original image
(docs/preprocessing.md, the data format section). We never trust that grid: every object's cells are derived again from
its mask (``rle``) or, without a mask, from its box, at the grid the processor actually produces for the image
(`padt.geometry.grids.GridGeometry`, transformers' ``smart_resize``), with the foreground rule of the record's task
(`padt.geometry.masks.FOREGROUND_RULES`). When the image is within min/max pixels the two grids agree and so do the
cells (tested).

**Objects without a foreground cell at the actual grid** (a thin or tiny object on a coarser grid) cannot simply be
dropped: the answer text names them. We use the cell that contains the centre of the object's box instead
(`box_centre_cell`) and report it (`padt.data.dataset.PaDTDataset` counts and logs these per dataset).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from padt.geometry.masks import ForegroundRule, box_mask, foreground_cells, rle_decode


def upscale_tiny_image(image: Image.Image, cell_size: int) -> Image.Image:
    """Authors' rule (the tiny-image step of `compute_loss` in `src/PaDT/trainer/padt_sft_trainer.py`; see
    docs/method.md#the-training-step-and-losses): if a side is under one cell, resize so the short side is
    ``cell_size`` (LANCZOS).

    The aspect ratio is kept (long side rounded, at least ``cell_size``); other images are returned unchanged.
    """
    w, h = image.size
    if min(w, h) >= cell_size:
        return image
    if min(w, h) < 1:
        raise ValueError(f"image has an empty side: {w}x{h}")
    scale = cell_size / min(w, h)
    new_w = cell_size if w <= h else max(cell_size, round(w * scale))
    new_h = cell_size if h < w else max(cell_size, round(h * scale))
    return image.resize((new_w, new_h), Image.Resampling.LANCZOS)


def box_centre_cell(box_xyxy: Sequence[float], grid_h: int, grid_w: int) -> int:
    """Row-major merged cell containing the centre of a normalised [x1, y1, x2, y2] box (clamped to the grid)."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    col = min(grid_w - 1, max(0, math.floor((x1 + x2) / 2 * grid_w)))
    row = min(grid_h - 1, max(0, math.floor((y1 + y2) / 2 * grid_h)))
    return row * grid_w + col


def object_mask(obj: dict, height: int, width: int) -> np.ndarray:
    """Full-resolution (H, W) uint8 mask of an object: its ``rle`` decoded, else its box (normalised xyxy) filled
    (`padt.geometry.masks.box_mask`, as preprocessing does for objects without segmentation).

    Raises ValueError when the RLE size is not the image size (the mask would not describe this image).
    """
    rle = obj.get("rle")
    if rle is not None:
        size = [int(v) for v in rle["size"]]
        if size != [int(height), int(width)]:
            raise ValueError(f"object RLE size {size} differs from the image size {[int(height), int(width)]}")
        return rle_decode(rle)
    x1, y1, x2, y2 = (float(v) for v in obj["bbox"])
    # rounded so that a pixel box normalised and scaled back (30 / W * W = 30.000000000000004) keeps its pixels
    pixels = [round(x1 * width, 6), round(y1 * height, 6), round(x2 * width, 6), round(y2 * height, 6)]
    return box_mask(pixels, height, width)


def derive_cells(
    obj: dict, height: int, width: int, grid_hw: tuple[int, int], *, cell_size: int, rule: ForegroundRule
) -> tuple[list[int], bool]:
    """Foreground cells of one object at the merged grid ``grid_hw`` of an image of original size (H, W).

    The mask (`object_mask`) is resized to ``grid * cell_size`` (= the processor's resized image) and thresholded by
    ``rule`` (`padt.geometry.masks.foreground_cells`). Returns ``(cells, used_fallback)``: sorted row-major cell indices, or
    ``([box_centre_cell], True)`` when no cell passes the rule.
    """
    mask = object_mask(obj, height, width)
    cells = foreground_cells(mask, grid_hw[0], grid_hw[1], cell_size=cell_size, **rule.kwargs())
    if cells:
        return cells, False
    return [box_centre_cell(obj["bbox"], grid_hw[0], grid_hw[1])], True


def gt_mask_at_patch_grid(rle: dict, patch_h: int, patch_w: int, upscale: int) -> np.ndarray:
    """Decoder mask target (docs/method.md#the-training-step-and-losses; the authors' `compute_loss` in
    `src/PaDT/trainer/padt_sft_trainer.py`): the full-res RLE mask resized with cv2 bilinear to (upscale*h, upscale*w).

    ``(patch_h, patch_w)`` is the 14-px patch grid (``image_grid_thw[1:]``). The decoded uint8 0/1 mask is resized
    as is (as the authors decode and resize it) and thresholded at > 0.5. Returns float32 (upscale*h, upscale*w)
    in {0, 1}.
    """
    try:
        import cv2
    except ImportError as err:
        raise ImportError("gt masks need OpenCV (the authors' bilinear resize): pip install opencv-python-headless") from err
    mask = rle_decode(rle)
    resized = cv2.resize(mask, (int(upscale) * int(patch_w), int(upscale) * int(patch_h)),
                         interpolation=cv2.INTER_LINEAR)
    return (resized.astype(np.float32) > 0.5).astype(np.float32)
