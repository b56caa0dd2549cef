"""The skip signal, the merged-grid choice, and image sizes: shared by every preprocessing script.

File reading and writing (JSON, JSON lines) is in `padt.io`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from padt.geometry.grids import GridGeometry, GridTooSmallError


class Skip(Exception):
    """Raised inside a record builder to skip the current record; ``reason`` goes into the SkipReport."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class GridSpec(GridGeometry):
    """The merged grid of preprocessing: `padt.geometry.grids.GridGeometry` whose default is the released data's
    grid, ``mode="round"`` ((round(H / cell), round(W / cell)) with cell = patch * merge); ``mode="processor"``
    reproduces the image processor's smart_resize with ``min_pixels``/``max_pixels``.

    An image too small to have a cell raises `Skip` (the record is counted in the report).
    """

    mode: str = "round"

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(grid_h, grid_w); raises Skip if the image is too small to have a cell."""
        try:
            return super().grid(height, width)
        except GridTooSmallError as err:
            raise Skip(str(err)) from None


# --------------------------------------------------------------------------- images
def image_size(entry: dict, image_root: str | os.PathLike | None, file_name: str) -> tuple[int, int]:
    """(height, width) of an image: from ``entry["height"/"width"]``, else read from the header of
    ``image_root/file_name`` in the upright frame (EXIF orientations 5-8 swap the stored sides).

    With ``image_root`` given, a missing image file raises Skip (the record is counted, not silently lost).
    """
    path = Path(image_root) / file_name if image_root is not None else None
    if path is not None and not path.is_file():
        raise Skip("image file not found under --image-root")
    height, width = entry.get("height"), entry.get("width")
    if height is None or width is None:
        if path is None:
            raise Skip("image size unknown (no height/width and no --image-root)")
        from padt.geometry.images import upright_size

        width, height = upright_size(path)  # the upright frame: EXIF orientations 5-8 swap the stored sides
    try:
        height, width = int(height), int(width)
    except (TypeError, ValueError):
        raise Skip("malformed image height/width") from None
    if height <= 0 or width <= 0:
        raise Skip("non-positive image height/width")
    return height, width
