"""Scenes of the shapes benchmark: the shape painter, sampling a scene from a generator, and rendering it.

Designed to be learnable by a tiny model trained from scratch on CPU: small images whose merged grid is the image
(168 x 168 px = 6 x 6 cells of 28 px by default), 1-4 large shapes, a closed vocabulary (`padt.shapes.options`), and
every answer fixed by the image (objects are listed in reading order).

:func:`sample_scene` draws a :class:`Scene` from a ``numpy`` generator: shapes (colour, kind, size, position, drawing
order), their *visible* masks (later shapes cover earlier ones), a background, the OVD prompt order and one referring
expression per object (`padt.shapes.expressions`). Scenes that break a constraint (too much occlusion, too few
foreground cells, an object no expression can single out) are re-drawn. :func:`render_scene` paints the RGB image
with :func:`paint_shape` (PIL, no anti-aliasing, so masks and pixels agree exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from padt.geometry.masks import FOREGROUND_RULES, foreground_cells, rle_area, rle_encode, rle_to_bbox_xywh
from padt.preprocess.templates import TASK_OVD, TASK_REFERRING, TASK_RIC
from padt.shapes.expressions import ObjectFacts, describe
from padt.shapes.options import BACKGROUNDS, KINDS, PALETTE, ShapesConfig

PAINTABLE_KINDS = KINDS + ("bar",)  # "bar": a band across the box, used by `padt.testing.sft_data`


# =========================================================================== the painter
def paint_shape(draw: ImageDraw.ImageDraw, kind: str, box: Sequence[int], fill) -> None:
    """Paint one shape in the pixel box ``[x1, y1, x2, y2)`` with ``fill``, without anti-aliasing (pixels and masks
    agree exactly).

    A ``square`` fills the box, a ``circle`` is the box's inscribed ellipse, a ``triangle`` points up from a base on the
    box's bottom row (these three touch all four sides), and a ``bar`` is a horizontal band across the box, ``max(4,
    (y2 - y1) // 4)`` px above and below its middle row.
    """
    x1, y1, x2, y2 = box
    if kind == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif kind == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif kind == "triangle":
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
    elif kind == "bar":
        cy = (y1 + y2) // 2
        half = max(4, (y2 - y1) // 4)
        draw.rectangle([x1, cy - half, x2 - 1, cy + half - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {PAINTABLE_KINDS}")


def shape_mask(kind: str, box: Sequence[int], height: int, width: int) -> np.ndarray:
    """`(H, W)` uint8 0/1 mask of the shape :func:`paint_shape` paints."""
    img = Image.new("L", (width, height), 0)
    paint_shape(ImageDraw.Draw(img), kind, box, 1)
    return np.asarray(img, dtype=np.uint8)


# =========================================================================== scenes
@dataclass(frozen=True)
class Shape:
    """A drawn shape: names, pixel box [x1, y1, x2, y2) (the shape touches all four sides) and its fill colour."""

    colour: str
    kind: str
    box: tuple[int, int, int, int]
    fill: tuple[int, int, int]

    def draw(self, draw: ImageDraw.ImageDraw, fill) -> None:
        """Paint the shape with ``fill`` (:func:`paint_shape`)."""
        paint_shape(draw, self.kind, self.box, fill)

    def mask(self, height: int, width: int) -> np.ndarray:
        """Full (unoccluded) mask (H, W) uint8 0/1."""
        return shape_mask(self.kind, self.box, height, width)


@dataclass
class SceneObject:
    """One object of a scene: its shape, visible mask (H, W) uint8, RLE, box, area and foreground cells per task."""

    shape: Shape
    mask: np.ndarray
    rle: dict
    bbox_xywh: list[float]  # tight box of the visible mask, pixels
    area: float  # visible pixels
    patches: dict[str, list[int]]  # task -> foreground cells under that task's rule
    expression: str = ""

    @property
    def facts(self) -> ObjectFacts:
        x, y, w, h = self.bbox_xywh
        return ObjectFacts(self.shape.colour, self.shape.kind, x + w / 2, y + h / 2, self.area)


@dataclass
class Scene:
    """A sampled scene. ``objects`` are in reading order (left to right); ``draw_order`` lists them back to front."""

    height: int
    width: int
    background: str
    background_rgb: tuple[int, int, int]
    gradient: tuple[float, float]  # background ramp: +gx at the right edge, +gy at the bottom (centred)
    noise_seed: int
    objects: list[SceneObject]
    draw_order: list[int]
    kind_order: list[str]  # the shuffled OVD category order


def _jitter(rgb: Sequence[int], amount: int, rng: np.random.Generator) -> tuple[int, int, int]:
    offsets = rng.integers(-amount, amount + 1, size=3) if amount else np.zeros(3, dtype=int)
    return tuple(int(np.clip(c + o, 0, 255)) for c, o in zip(rgb, offsets))


def sample_names(rng: np.random.Generator, config: ShapesConfig) -> list[tuple[str, str]]:
    """(colour, kind) of each object: uniform count in [min, max], uniform names, at most ``max_same`` alike."""
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    names: list[tuple[str, str]] = []
    while len(names) < n:
        pair = (config.colours[int(rng.integers(len(config.colours)))], config.kinds[int(rng.integers(len(config.kinds)))])
        if names.count(pair) < config.max_same:
            names.append(pair)
    return names


def sample_shape(rng: np.random.Generator, colour: str, kind: str, config: ShapesConfig) -> Shape:
    """A shape of uniform side in ``size_range`` x min(H, W), placed uniformly fully inside the image."""
    short = min(config.height, config.width)
    lo, hi = (max(1, round(f * short)) for f in config.size_range)
    side = int(rng.integers(lo, hi + 1))
    x1 = int(rng.integers(0, config.width - side + 1))
    y1 = int(rng.integers(0, config.height - side + 1))
    return Shape(colour, kind, (x1, y1, x1 + side, y1 + side), _jitter(PALETTE[colour], config.colour_jitter, rng))


def visible_masks(full_masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask (N x (H, W)) when drawn in list order: later masks cover earlier ones."""
    out, cover = [], np.zeros_like(full_masks[0]) if full_masks else None
    for m in reversed(full_masks):
        out.append((m & (1 - cover)).astype(np.uint8))
        cover = cover | m
    return out[::-1]


def _place_shapes(rng: np.random.Generator, names, config: ShapesConfig) -> tuple[list[Shape], list[np.ndarray]] | None:
    """Shapes in drawing order whose visible fraction stays >= 1 - max_occlusion; None if placement fails."""
    shapes: list[Shape] = []
    masks: list[np.ndarray] = []
    for colour, kind in names:
        for _ in range(config.max_attempts):
            shape = sample_shape(rng, colour, kind, config)
            mask = shape.mask(config.height, config.width)
            vis = visible_masks(masks + [mask])
            if all(v.sum() >= (1 - config.max_occlusion) * m.sum() for v, m in zip(vis, masks)):
                shapes.append(shape)
                masks.append(mask)
                break
        else:
            return None
    return shapes, masks


def _scene_object(shape: Shape, mask: np.ndarray, config: ShapesConfig) -> SceneObject | None:
    """A SceneObject from a visible mask, or None if some task's rule gives it fewer than ``min_cells`` cells."""
    grid_h, grid_w = config.grid
    patches = {
        task: foreground_cells(mask, grid_h, grid_w, cell_size=config.cell_size, **FOREGROUND_RULES[task].kwargs())
        for task in (TASK_OVD, TASK_REFERRING, TASK_RIC)
    }
    if min(len(p) for p in patches.values()) < config.min_cells:
        return None
    rle = rle_encode(mask)
    return SceneObject(shape, mask, rle, rle_to_bbox_xywh(rle), float(rle_area(rle)), patches)


def sample_scene(rng: np.random.Generator, config: ShapesConfig) -> Scene:
    """Draw a scene that satisfies every constraint of ``config`` (re-drawing up to ``max_attempts`` times).

    Raises:
        RuntimeError: no valid scene within ``max_attempts`` (the options are too tight, e.g. shapes too large).
    """
    for _ in range(config.max_attempts):
        placed = _place_shapes(rng, sample_names(rng, config), config)
        if placed is None:
            continue
        shapes, full = placed
        objects = [_scene_object(s, m, config) for s, m in zip(shapes, visible_masks(full))]
        if any(o is None for o in objects):
            continue
        expressions = [describe(i, [o.facts for o in objects], config, rng) for i in range(len(objects))]
        if any(e is None for e in expressions):
            continue
        for obj, expr in zip(objects, expressions):
            obj.expression = expr.text()
        reading = sorted(range(len(objects)), key=lambda i: (objects[i].facts.cx, objects[i].facts.cy, i))
        draw_order = [reading.index(i) for i in range(len(objects))]
        bg = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
        gradient = tuple(float(v) for v in rng.uniform(-config.gradient, config.gradient, size=2))
        kind_order = [config.kinds[int(i)] for i in rng.permutation(len(config.kinds))]
        return Scene(
            height=config.height, width=config.width, background=bg,
            background_rgb=_jitter(BACKGROUNDS[bg], config.background_jitter, rng), gradient=gradient,
            noise_seed=int(rng.integers(2**31)), objects=[objects[i] for i in reading], draw_order=draw_order,
            kind_order=kind_order,
        )
    raise RuntimeError(
        f"no valid scene in {config.max_attempts} attempts: relax the options (smaller size_range, fewer objects, "
        "larger max_occlusion, smaller position_margin / size_ratio)"
    )


# =========================================================================== rendering
def render_scene(scene: Scene, noise: int = 3) -> Image.Image:
    """RGB image (W x H) of a scene: background colour + linear ramp, shapes back to front, then +/- ``noise``."""
    h, w = scene.height, scene.width
    ys = (np.arange(h, dtype=np.float64)[:, None] / max(h - 1, 1) - 0.5) * 2
    xs = (np.arange(w, dtype=np.float64)[None, :] / max(w - 1, 1) - 0.5) * 2
    ramp = scene.gradient[0] * xs + scene.gradient[1] * ys  # (H, W)
    base = np.asarray(scene.background_rgb, dtype=np.float64)[None, None, :] + ramp[..., None]
    img = Image.fromarray(np.clip(np.rint(base), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for i in scene.draw_order:
        scene.objects[i].shape.draw(draw, scene.objects[i].shape.fill)
    if noise:
        rng = np.random.default_rng(scene.noise_seed)
        pixels = np.asarray(img, dtype=np.int16) + rng.integers(-noise, noise + 1, size=(h, w, 3), dtype=np.int16)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return img
