"""File I/O with clear errors, the merged-grid choice, and image sizes: shared by every preprocessing script."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from padt.geometry.masks import merged_grid_for_image, rounded_grid

GRID_MODES = ("round", "processor")


class Skip(Exception):
    """Raised inside a record builder to skip the current record; ``reason`` goes into the SkipReport."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- files
def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file; missing file or malformed JSON raise with the path (and line/column) in the message."""
    path = require_file(path, what)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"malformed JSON in {what} {path}: line {err.lineno} column {err.colno}: {err.msg}") from None


def iter_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> Iterator[tuple[int, Any]]:
    """Yield (line_number, object) for each non-blank line; malformed lines raise with path and line number."""
    path = require_file(path, what)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"malformed JSON in {what} {path} at line {lineno}: {err.msg}") from None


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Write one compact JSON object per line (keys in insertion order), atomically; return the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record))
                f.write("\n")
                count += 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return count


# --------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class GridSpec:
    """How to choose the merged grid of an image of size (H, W).

    ``mode="round"`` is the released data's grid, (round(H / cell), round(W / cell)) with cell = patch * merge;
    ``mode="processor"`` reproduces the image processor's smart_resize with ``min_pixels``/``max_pixels``.
    """

    patch_size: int
    merge_size: int
    mode: str = "round"
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in GRID_MODES:
            raise ValueError(f"grid mode must be one of {GRID_MODES}, got {self.mode!r}")
        if self.patch_size < 1 or self.merge_size < 1:
            raise ValueError(f"patch_size and merge_size must be >= 1, got {self.patch_size}, {self.merge_size}")
        if self.mode == "processor" and (self.min_pixels is None or self.max_pixels is None):
            raise ValueError("grid mode 'processor' needs min_pixels and max_pixels")

    @property
    def cell_size(self) -> int:
        return self.patch_size * self.merge_size

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(grid_h, grid_w); raises Skip if the image is too small to have a cell."""
        if self.mode == "round":
            gh, gw = rounded_grid(height, width, cell_size=self.cell_size)
        else:
            gh, gw = merged_grid_for_image(
                height, width, patch_size=self.patch_size, merge_size=self.merge_size,
                min_pixels=self.min_pixels, max_pixels=self.max_pixels,
            )
        if gh < 1 or gw < 1:
            raise Skip(f"image too small for the merged grid (side < {self.cell_size / 2:g} px)")
        return gh, gw


# --------------------------------------------------------------------------- images
def image_size(entry: dict, image_root: str | os.PathLike | None, file_name: str) -> tuple[int, int]:
    """(height, width) of an image: from ``entry['height'/'width']``, else read from ``image_root/file_name``.

    With ``image_root`` given, a missing image file raises Skip (the record is counted, not silently lost).
    """
    path = Path(image_root) / file_name if image_root is not None else None
    if path is not None and not path.is_file():
        raise Skip("image file not found under --image-root")
    height, width = entry.get("height"), entry.get("width")
    if height is None or width is None:
        if path is None:
            raise Skip("image size unknown (no height/width and no --image-root)")
        from PIL import Image

        with Image.open(path) as img:
            width, height = img.size
    try:
        height, width = int(height), int(width)
    except (TypeError, ValueError):
        raise Skip("malformed image height/width") from None
    if height <= 0 or width <= 0:
        raise Skip("non-positive image height/width")
    return height, width
