"""Drawings of a `Prediction` with PIL only: boxes with labels, masks, and the VRT cells the model chose."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from padt.inference.predictor import Prediction
from padt.processing.vrt import merged_grid

# red, orange, gold, chartreuse, blue (the authors' demo palette)
PALETTE = [(255, 0, 0), (255, 165, 0), (255, 215, 0), (127, 255, 0), (0, 0, 255)]


def draw_boxes(image: Image.Image, pred: Prediction) -> Image.Image:
    """`image` with a red box and a filled label tag per object."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for obj in pred.objects:
        x1, y1, x2, y2 = obj.box_xyxy
        draw.rectangle([x1, y1, x2, y2], outline=(255, 0, 0), width=2)
        tag = f"{obj.label or 'object'} {obj.score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), tag)
        draw.rectangle([left, top, right + 2, bottom + 2], fill=(255, 0, 0))
        draw.text((x1 + 1, y1 + 1), tag, fill=(0, 0, 0))
    return out


def draw_masks(image: Image.Image, pred: Prediction) -> Image.Image:
    """Masks alone, one palette colour per object, on black, at the image's size."""
    canvas = np.zeros((image.height, image.width, 3), dtype=np.uint8)
    for i, obj in enumerate(pred.objects):
        if obj.mask is not None:
            canvas[obj.mask] = PALETTE[i % len(PALETTE)]
    return Image.fromarray(canvas)


def draw_vrt_cells(image: Image.Image, pred: Prediction, cell_size_px: int, spatial_merge_size: int) -> Image.Image:
    """0.6 x coloured VRT cells + 0.4 x image, each chosen cell numbered with its VRT index.

    Cells live on the processor's resized grid (`grid_thw`, in patches); they are drawn scaled to the original image.
    """
    if pred.grid_thw is None:
        return image.convert("RGB").copy()
    _, rows, cols = merged_grid(pred.grid_thw, spatial_merge_size)
    sx, sy = image.width / cols, image.height / rows
    base = image.convert("RGB")
    cells = Image.new("RGB", base.size, (0, 0, 0))
    draw = ImageDraw.Draw(cells)
    labels = []
    for i, obj in enumerate(pred.objects):
        for k in obj.vrt_ids:
            r, c = divmod(int(k), cols)
            box = [c * sx, r * sy, (c + 1) * sx - 1, (r + 1) * sy - 1]
            draw.rectangle(box, fill=PALETTE[i % len(PALETTE)])
            labels.append((box, str(k)))
    out = Image.blend(base, cells, 0.6)
    text = ImageDraw.Draw(out)
    for box, k in labels:
        text.text((box[0] + 1, box[1] + 1), k, fill=(255, 255, 255))
    return out
