"""A tiny, fully local PaDT training set: generated images of coloured shapes in the released JSONL format
(docs/preprocessing.md), plus a tiny random PaDT model and its processor (`padt.testing.models.build_tiny_checkpoint`).
It is what `run_scripts/padt_tiny_cpu_sft.sh` trains on, and what the trainer tests use; no download.

Each image holds 0-2 shapes (a filled square / disk / bar of one colour, painted by `padt.shapes.scenes.paint_shape`)
on a plain background. Records come in the
three task formats: OVD (categories listed in the prompt; images *without* objects get the "No objects" answer, so
that in a 2-process run one rank sees batches without objects), REC (one shape by a sentence) and RIC (a caption with
one `<|Obj_k|>` per shape). Objects carry what the released data carries: foreground ``patches`` on the rounded
merged grid (the authors' rule of the task), a normalised xyxy ``bbox``, ``iscrowd``, ``area``, a COCO ``rle`` of
the full-resolution mask and a ``label``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from padt.geometry.grids import rounded_grid
from padt.geometry.masks import FOREGROUND_RULES, foreground_cells, rle_area, rle_encode
from padt.preprocess.objects import make_object
from padt.preprocess.templates import (
    RIC_PROMPT,
    TASK_OVD,
    TASK_REFERRING,
    TASK_RIC,
    make_record,
    obj_placeholder,
    ovd_answer,
    ovd_prompt,
    rec_answer,
    rec_prompt,
)
from padt.shapes.scenes import paint_shape, shape_mask
from padt.testing.models import build_tiny_checkpoint

COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (230, 210, 40)}
SHAPES = ("square", "disk", "bar")
PAINTED_KINDS = {"square": "square", "disk": "circle", "bar": "bar"}  # our names -> `padt.shapes.scenes.paint_shape`'s
TINY_MAX_PIXELS = 64 * 28 * 28  # the workspace processor's limit: 64 merged cells (min: the default 4)


@dataclass(frozen=True)
class Shape:
    """One drawn object: its category words and its pixel box [x1, y1, x2, y2) in the image."""

    colour: str
    kind: str
    box: tuple[int, int, int, int]

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"

    def mask(self, height: int, width: int) -> np.ndarray:
        """(H, W) uint8 0/1 mask of the shape."""
        return shape_mask(PAINTED_KINDS[self.kind], self.box, height, width)

    def draw(self, draw: ImageDraw.ImageDraw) -> None:
        paint_shape(draw, PAINTED_KINDS[self.kind], self.box, COLOURS[self.colour])


def _random_shapes(rng: random.Random, n: int, height: int, width: int) -> list[Shape]:
    """`n` non-overlapping shapes of distinct labels, each at least 36 px wide (several merged cells)."""
    shapes: list[Shape] = []
    labels = [(c, k) for c in COLOURS for k in SHAPES]
    rng.shuffle(labels)
    halves = [(0, width // 2), (width // 2, width)] if n > 1 else [(0, width)]
    for (colour, kind), (lo, hi) in zip(labels[:n], halves):
        side = rng.randint(36, min(hi - lo, height) - 4)
        x1 = rng.randint(lo, hi - side)
        y1 = rng.randint(0, height - side)
        shapes.append(Shape(colour, kind, (x1, y1, x1 + side, y1 + side)))
    return shapes


def _object(shape: Shape, height: int, width: int, task: str, cell_size: int) -> dict:
    mask = shape.mask(height, width)
    rle = rle_encode(mask)
    grid_h, grid_w = rounded_grid(height, width, cell_size=cell_size)
    patches = foreground_cells(mask, grid_h, grid_w, cell_size=cell_size, **FOREGROUND_RULES[task].kwargs())
    if not patches:
        raise ValueError(f"shape {shape} has no foreground cell at the {grid_h}x{grid_w} grid; make it larger")
    ys, xs = np.nonzero(mask)
    bbox = [xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height]
    return make_object(patches, [float(v) for v in bbox], 0, float(rle_area(rle)), rle, shape.label)


def _record(i: int, shapes: list[Shape], height: int, width: int, task: str, image: str, rng: random.Random,
            cell_size: int) -> dict:
    if task == TASK_OVD:
        present = [s.label for s in shapes]
        absent = [f"{c} {k}" for c in COLOURS for k in SHAPES if f"{c} {k}" not in present]
        names = present + rng.sample(absent, 2)
        rng.shuffle(names)
        by_label = {s.label: s for s in shapes}
        ordered = [by_label[n] for n in names if n in by_label]
        objects = [_object(s, height, width, task, cell_size) for s in ordered]
        return make_record(i, image, ovd_prompt(names), ovd_answer([(n, int(n in by_label)) for n in names]),
                           objects, task)
    if task == TASK_REFERRING:
        shape = shapes[0]
        sentence = f"the {shape.label}"
        return make_record(i, image, rec_prompt(sentence), rec_answer(sentence),
                           [_object(shape, height, width, task, cell_size)], task)
    if task == TASK_RIC:
        parts = [f"a {s.label} ({obj_placeholder(k)})" for k, s in enumerate(shapes)]
        caption = "There is " + " and ".join(parts) + " on a plain background."
        return make_record(i, image, RIC_PROMPT, caption,
                           [_object(s, height, width, task, cell_size) for s in shapes], task)
    raise ValueError(f"unknown task {task!r}; expected one of {(TASK_OVD, TASK_REFERRING, TASK_RIC)}")


def make_tiny_sft_data(
    out_dir: str | os.PathLike,
    num_images: int = 8,
    num_empty: int = 3,
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = ((112, 112), (112, 140), (140, 112), (84, 112)),
    cell_size: int = 28,
    file_name: str = "train.jsonl",
    objects_per_image: int | None = None,
    tasks: tuple[str, ...] = (TASK_OVD, TASK_REFERRING, TASK_RIC),
) -> Path:
    """Write `num_images` generated images to `out_dir/images/` and their records to `out_dir/<file_name>`.

    Args:
        num_images: records (one image each). The first `num_empty` are OVD images without any object (the answer
            is "No objects from the list are present in the image."); the others cycle through OVD, REC and RIC
            with 1-2 shapes each.
        sizes: (height, width) choices, cycled; keep them inside the tiny processor's pixel limits so that the
            stored `patches` equal the processor's grid.
        cell_size: pixels per merged cell of the stored `patches` (patch_size * merge_size).
        objects_per_image: shapes per non-empty image (1 or 2; REC records always name one); None = 1 and 2 in turn.
        tasks: task formats of the non-empty records, cycled.
    Returns:
        Path of the JSONL file. Same arguments -> byte-identical files.
    """
    if num_images < 1 or not 0 <= num_empty <= num_images:
        raise ValueError(f"need num_images >= 1 and 0 <= num_empty <= num_images, got {num_images}, {num_empty}")
    if objects_per_image not in (None, 1, 2):
        raise ValueError(f"objects_per_image must be 1, 2 or None, got {objects_per_image}")
    if not tasks:
        raise ValueError("tasks is empty")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(num_images):
        height, width = sizes[i % len(sizes)]
        empty = i < num_empty
        task = TASK_OVD if empty else tasks[(i - num_empty) % len(tasks)]
        n = 0 if empty else (1 if task == TASK_REFERRING else objects_per_image or 1 + (i % 2))
        shapes = _random_shapes(rng, n, height, width)
        background = tuple(rng.randint(90, 160) for _ in range(3))
        img = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(img)
        for s in shapes:
            s.draw(draw)
        name = f"tiny_{i:03d}.png"
        img.save(out / "images" / name)
        records.append(_record(i, shapes, height, width, task, name, rng, cell_size))
    path = out / file_name
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    return path


def make_tiny_sft_workspace(out_dir: str | os.PathLike, num_images: int = 8, num_empty: int = 3,
                            seed: int = 0) -> dict[str, Path]:
    """`out_dir/model` (tiny model + processor) and `out_dir/data` (images + train.jsonl); returns their paths."""
    out = Path(out_dir)
    model_dir = build_tiny_checkpoint(out / "model", seed, placeholder=False, max_pixels=TINY_MAX_PIXELS)
    data_file = make_tiny_sft_data(out / "data", num_images=num_images, num_empty=num_empty, seed=seed)
    return {"model": model_dir, "data_file": data_file, "image_folder": out / "data" / "images"}
