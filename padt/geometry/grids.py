"""Image size -> merged grid: Qwen's `smart_resize`, the released data's rounded grid, and `GridGeometry`.

A *merged grid* is the grid of visual tokens after the vision tower's spatial merge: one cell (one VRT) covers
``cell_size = patch_size * merge_size`` resized pixels (28 for Qwen2.5-VL), cells are indexed row-major,
``index = row * grid_w + col``. Two grids are in use:

* the processor's grid (``mode="processor"``): the image is resized by `smart_resize` (sides multiples of
  ``cell_size``, pixel count within ``[min_pixels, max_pixels]``) and the grid is the resized size / ``cell_size``;
* the released data's grid (``mode="round"``): ``(round(H / cell), round(W / cell))`` of the original image, which the
  authors' preprocessing used for the JSONL ``patches`` (docs/preprocessing.md, the data format section).

They agree whenever the processor does not rescale (an image within min/max pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

GRID_MODES = ("round", "processor")


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    max_ratio: float = 200.0,
    *,
    at_least_one_cell: bool = True,
) -> tuple[int, int]:
    """Qwen's resize rule: ``(height, width)`` -> resized ``(h, w)``, multiples of ``factor`` (= patch * merge),
    ``h * w`` within ``[min_pixels, max_pixels]``, aspect ratio kept as far as possible.

    Defaults follow qwen_vl_utils: ``min_pixels = 4 * factor**2``, ``max_pixels = 16384 * factor**2``.

    Args:
        at_least_one_cell (`bool`): qwen_vl_utils' rule (default): a side rounds to at least ``factor`` before the
            pixel limits are checked. False gives transformers' image-processor rule (5.23), where a side under
            ``factor / 2`` first rounds to 0 and the image is then scaled up to ``min_pixels``; the two differ only
            for such thin images. The image processor's grid (`merged_grid_for_image`) uses False.
    """
    min_pixels = 4 * factor**2 if min_pixels is None else int(min_pixels)
    max_pixels = 16384 * factor**2 if max_pixels is None else int(max_pixels)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
    if max(height, width) / min(height, width) > max_ratio:
        raise ValueError(f"aspect ratio must be <= {max_ratio}, got {max(height, width) / min(height, width):.1f}")
    floor = factor if at_least_one_cell else 0
    h_bar = max(floor, round(height / factor) * factor)
    w_bar = max(floor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def rounded_grid(height: int, width: int, *, cell_size: int) -> tuple[int, int]:
    """The preprocessing grid of the released data: (round(H / cell), round(W / cell)), Python half-to-even round.

    It equals :func:`merged_grid_for_image` whenever the processor does not rescale (image within min/max pixels).
    """
    if cell_size <= 0:
        raise ValueError(f"cell_size must be positive, got {cell_size}")
    return round(height / cell_size), round(width / cell_size)


def merged_grid_for_image(
    height: int, width: int, *, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Merged-token grid (grid_h, grid_w) the Qwen2-VL/2.5-VL image processor produces for an image (H, W).

    `smart_resize` with transformers' rule (``at_least_one_cell=False``) and ``factor = patch_size * merge_size``: the
    resized image is (grid_h * factor, grid_w * factor), and ``image_grid_thw = (1, grid_h * merge, grid_w * merge)``.
    """
    factor = patch_size * merge_size
    h_bar, w_bar = smart_resize(height, width, factor, min_pixels, max_pixels, at_least_one_cell=False)
    return h_bar // factor, w_bar // factor


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


class GridTooSmallError(ValueError):
    """An image has no merged cell at the chosen grid (a side under half a cell with ``mode="round"``)."""


@dataclass(frozen=True)
class GridGeometry:
    """What decides an image's merged grid: ViT patch size, spatial merge size and either the processor's pixel
    limits (``mode="processor"``, the default) or the released data's rounding (``mode="round"``).

    ``cell_size = patch_size * merge_size`` resized pixels per merged cell (one VRT). ``min_pixels``/``max_pixels``
    are required for ``mode="processor"`` and unused by ``mode="round"``.
    """

    patch_size: int
    merge_size: int
    min_pixels: int | None = None
    max_pixels: int | None = None
    mode: str = "processor"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.mode not in GRID_MODES:
            raise ValueError(f"{name}.mode must be one of {GRID_MODES}, got {self.mode!r}")
        for field in ("patch_size", "merge_size"):
            if not _positive_int(getattr(self, field)):
                raise ValueError(f"{name}.{field} must be a positive int, got {getattr(self, field)!r}")
        for field in ("min_pixels", "max_pixels"):
            value = getattr(self, field)
            if value is None:
                if self.mode == "processor":
                    raise ValueError(f"{name}.{field} is needed for mode 'processor' (the processor's pixel limits)")
            elif not _positive_int(value):
                raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
        if self.min_pixels is not None and self.max_pixels is not None and self.max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels ({self.max_pixels}) must be >= min_pixels ({self.min_pixels})")

    @property
    def cell_size(self) -> int:
        return int(self.patch_size) * int(self.merge_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Merged grid ``(grid_h, grid_w)`` of an image of ``height x width`` pixels.

        Raises `GridTooSmallError` (a `ValueError`) when the grid has no cell (only possible with ``mode="round"``).
        """
        if self.mode == "round":
            gh, gw = rounded_grid(int(height), int(width), cell_size=self.cell_size)
        else:
            gh, gw = merged_grid_for_image(int(height), int(width), patch_size=int(self.patch_size),
                                           merge_size=int(self.merge_size), min_pixels=int(self.min_pixels),
                                           max_pixels=int(self.max_pixels))
        if gh < 1 or gw < 1:
            raise GridTooSmallError(f"image too small for the merged grid (side < {self.cell_size / 2:g} px)")
        return gh, gw

    @classmethod
    def from_processor(cls, processor: Any) -> GridGeometry:
        """The processor's geometry (``mode="processor"``) from a `PaDTProcessor`, a Qwen2.5-VL processor or its
        image processor.

        Pixel limits come from ``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}`` (transformers 5.x),
        else from ``min_pixels``/``max_pixels`` attributes.
        """
        ip = processor
        for _ in range(3):  # PaDTProcessor -> Qwen processor -> image processor
            if hasattr(ip, "patch_size") and hasattr(ip, "merge_size"):
                break
            ip = getattr(ip, "image_processor", None)
            if ip is None:
                break
        if ip is None or not hasattr(ip, "patch_size") or not hasattr(ip, "merge_size"):
            raise TypeError(f"cannot read patch_size/merge_size from {type(processor).__name__}: pass a PaDTProcessor, "
                            "a Qwen2.5-VL processor or its image processor")
        size = getattr(ip, "size", None)

        def _size_value(key: str, attr: str):
            value = None
            if size is not None:
                value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
            return value if value is not None else getattr(ip, attr, None)

        min_pixels, max_pixels = _size_value("shortest_edge", "min_pixels"), _size_value("longest_edge", "max_pixels")
        if min_pixels is None or max_pixels is None:
            raise ValueError(f"the image processor {type(ip).__name__} has no min/max pixels (size={size!r})")
        return cls(int(ip.patch_size), int(ip.merge_size), int(min_pixels), int(max_pixels), mode="processor")
