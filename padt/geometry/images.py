"""Reading images the same way everywhere: upright (EXIF orientation applied) and as 8-bit RGB, whatever the mode.

- `to_rgb`: any PIL mode -> RGB. 16-bit (``I;16*``, and ``I`` when its values fit 0..65535) is scaled by 255/65535
  (mid-grey 32768 -> 128), other ``I`` and float ``F`` by their actual min..max range; transparent images (``RGBA``,
  ``LA``, ``PA``, ``P`` with a transparency entry, premultiplied ``RGBa``/``La``) are composited on white, as
  qwen_vl_utils does; ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr`` ... go through `PIL.Image.Image.convert`.
- `upright`: `PIL.ImageOps.exif_transpose` (the pixels a viewer shows; boxes and masks refer to them).
- `read_image`: a path -> upright RGB image, with clear errors for a missing path or a directory.
- `upright_size`: ``(width, height)`` of an image file in the upright frame, from its header (a JPEG stored 40x20
  with EXIF orientation 6 or 8 is 20x40).
- `check_aspect_ratio`: the processor's 200:1 limit (`padt.geometry.grids.smart_resize`), checked up front with a
  message naming the image size.

Only PIL and numpy are needed.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["MAX_ASPECT_RATIO", "check_aspect_ratio", "read_image", "to_rgb", "upright", "upright_size"]

MAX_ASPECT_RATIO = 200.0  # the default ``max_ratio`` of `padt.geometry.grids.smart_resize` (and transformers')
_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
_TRANSPARENT = ("RGBA", "LA", "PA", "RGBa", "La")


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned upright by its EXIF orientation tag (`PIL.ImageOps.exif_transpose`); ``img`` itself if it has
    no orientation to apply."""
    if img.getexif().get(_ORIENTATION, 1) in (1, None):
        return img
    return ImageOps.exif_transpose(img)


def _scaled(values: np.ndarray, lo: float, hi: float) -> Image.Image:
    """``values`` mapped linearly from ``[lo, hi]`` to ``0..255`` (rounded, clipped) as an ``L`` image."""
    values = np.nan_to_num(values.astype(np.float64), nan=lo, posinf=hi, neginf=lo)
    scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, keeping what the pixels mean (see the module docstring for the rule per mode).

    Raises:
        ValueError: for a mode PIL cannot convert to RGB, naming the mode.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        return _scaled(np.asarray(img), 0.0, 65535.0).convert("RGB")
    if mode in ("I", "F"):
        values = np.asarray(img)
        if mode == "I" and values.size and values.min() >= 0 and values.max() <= 65535:
            return _scaled(values, 0.0, 65535.0).convert("RGB")
        finite = values[np.isfinite(values)] if mode == "F" else values
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        return _scaled(values, lo, hi).convert("RGB")
    if mode in _TRANSPARENT or (mode == "P" and "transparency" in img.info) or (
            mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise ValueError(f"cannot convert an image of PIL mode {mode!r} to RGB ({err}); save it as PNG or JPEG "
                         "in an RGB, grey or palette mode") from None


def _checked_path(path: str | os.PathLike) -> str:
    """``path`` as a string, after checking it names an existing file (FileNotFoundError / ValueError if not)."""
    src = os.fspath(path)
    if os.path.isdir(src):
        raise ValueError(f"image path {src} is a directory, not an image file; pass the path of an image file")
    if not os.path.exists(src):
        raise FileNotFoundError(f"image file {src} does not exist; pass the path of an image file")
    return src


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path``, upright (EXIF orientation applied) and in RGB (`to_rgb`), fully loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory, or the mode cannot be converted.
        PIL.UnidentifiedImageError: the file is not an image PIL can read.
    """
    with Image.open(_checked_path(path)) as img:
        img.load()
        rgb = to_rgb(upright(img))
        return img.copy() if rgb is img else rgb  # closing ``img`` below would invalidate it


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of the image file at ``path`` in the upright frame (EXIF orientation 5-8 swap the stored
    sides), read from the header. Same errors as `read_image`."""
    with Image.open(_checked_path(path)) as img:
        width, height = img.size
        if img.getexif().get(_ORIENTATION, 1) in _TRANSPOSED:
            width, height = height, width
    return width, height


def check_aspect_ratio(width: int, height: int, max_ratio: float = MAX_ASPECT_RATIO, what: str = "image") -> None:
    """Raise a ValueError naming the size when ``max(w, h) / min(w, h)`` exceeds ``max_ratio`` (or a side is not
    positive): the processor's resize (`padt.geometry.grids.smart_resize`) cannot handle such an image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} size must be positive, got {width}x{height} (width x height)")
    ratio = max(width, height) / min(width, height)
    if ratio > max_ratio:
        raise ValueError(f"{what} of size {width}x{height} (width x height) has aspect ratio {ratio:.1f}, over the "
                         f"limit of {max_ratio:g} of the Qwen2.5-VL processor; crop or pad it to a ratio <= "
                         f"{max_ratio:g}")
