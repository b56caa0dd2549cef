"""A synthetic, fully local PaDT data set: scenes of coloured shapes with exact boxes and masks, in the released
JSONL format (spec 7 and 8) for all four tasks, plus COCO-format ground truth.

Designed to be learnable by a tiny model trained from scratch on CPU: small images whose merged grid is the image
(168 x 168 px = 6 x 6 cells of 28 px by default), 1-4 large shapes, a closed vocabulary (5 colours, 3 kinds, 4
backgrounds), short sentences, and every answer fixed by the image (objects are listed in reading order).

Pipeline (each step a small pure function of its inputs):

1. :func:`sample_scene` draws a :class:`Scene` from a ``numpy`` generator: shapes (colour, kind, size, position,
   drawing order), their *visible* masks (later shapes cover earlier ones), a background, the OVD prompt order and
   one referring expression per object. Scenes that break a constraint (too much occlusion, too few foreground
   cells, an object no expression can single out) are re-drawn.
2. :func:`render_scene` paints the RGB image (PIL, no anti-aliasing, so masks and pixels agree exactly).
3. :func:`ovd_record`, :func:`referring_records`, :func:`ric_record` and :func:`coco_entries` turn a scene into
   records / COCO entries with :mod:`padt.preprocess.templates` and :mod:`padt.geometry.masks`.
4. :func:`generate_split` / :func:`generate_dataset` write images and files; scene ``i`` of split ``s`` uses the
   generator ``numpy.random.default_rng([seed, SPLIT_STREAMS[s], i])``, so splits never share a stream and a scene
   does not depend on how many images are generated.

Referring expressions (:class:`Expression`) have the grammar ``the [larger|smaller] COLOUR KIND [on the left|on the
right|at the top|at the bottom]``; :func:`referents` is their semantics, and every generated expression has exactly
one referent. See docs/shapes.md.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from padt.geometry.masks import (
    FOREGROUND_RULES,
    foreground_cells,
    normalize_box_xywh,
    rle_area,
    rle_encode,
    rle_to_bbox_xywh,
    rounded_grid,
)
from padt.preprocess.common import write_jsonl
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

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (45, 85, 230), "yellow": (235, 215, 40),
    "white": (240, 240, 240), "orange": (240, 140, 30), "cyan": (40, 210, 220), "pink": (240, 130, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (120, 120, 120), "black": (25, 25, 25), "purple": (85, 45, 105), "brown": (105, 75, 45),
}
KINDS = ("square", "circle", "triangle")
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
PROMPT_ORDERS = ("auto", "shuffle", "id")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
SIZE_RELATIONS = ("larger", "smaller")
RELATIONS = tuple(POSITION_PHRASES) + SIZE_RELATIONS
CELL_CLASS_SETS = ("kind", "colour_kind")


def cell_class_names(options: Mapping[str, Sequence[str]], classes: str = "kind") -> list[str]:
    """Cell categories of a generated set, from its manifest's `options`: the kinds (`"kind"`), or every
    "colour kind" (`"colour_kind"`, colours outer). Used by vision stage 0 and the cell-category loss."""
    if classes == "kind":
        return list(options["kinds"])
    if classes == "colour_kind":
        return [f"{colour} {kind}" for colour in options["colours"] for kind in options["kinds"]]
    raise ValueError(f"cell classes must be one of {CELL_CLASS_SETS}, got {classes!r}")


# =========================================================================== options
@dataclass(frozen=True)
class ShapesConfig:
    """Everything that shapes the data (the seed and the image counts excepted); stored in ``manifest.json``."""

    height: int = 168
    width: int = 168
    patch_size: int = 14
    merge_size: int = 2
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "white")
    kinds: tuple[str, ...] = KINDS
    backgrounds: tuple[str, ...] = ("gray", "black", "purple", "brown")
    min_objects: int = 1
    max_objects: int = 4
    max_same: int = 2  # at most this many objects share (colour, kind)
    size_range: tuple[float, float] = (0.25, 0.5)  # shape side / min(H, W)
    max_occlusion: float = 0.3  # largest hidden fraction of a shape
    min_cells: int = 2  # fewest foreground merged cells of a visible object, under every task's rule
    position_margin: float = 0.15  # "on the left": centres at least this fraction of the width apart
    size_ratio: float = 1.5  # "the larger": visible area at least this many times the other's
    colour_jitter: int = 15  # per-channel +/- on a shape's fill
    background_jitter: int = 12  # per-channel +/- on the background colour
    gradient: int = 12  # largest +/- of the background's linear ramp
    noise: int = 3  # per-pixel +/- noise on the whole image
    ovd_prompt_order: str = "auto"  # auto: shuffled for "train", category-id order for other splits
    max_attempts: int = 500

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1 or self.patch_size < 1 or self.merge_size < 1:
            raise ValueError(f"image size, patch_size and merge_size must be >= 1, got {self.height}x{self.width}, "
                             f"{self.patch_size}, {self.merge_size}")
        if min(self.grid) < 1:
            raise ValueError(f"a {self.height}x{self.width} image has no {self.cell_size}-px merged cell")
        for name, values, known in (("colours", self.colours, PALETTE), ("kinds", self.kinds, KINDS),
                                    ("backgrounds", self.backgrounds, BACKGROUNDS)):
            unknown = [v for v in values if v not in known]
            if not values or unknown or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct names from {sorted(known)}, got {list(values)}")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > self.max_same * len(self.colours) * len(self.kinds):
            raise ValueError("max_objects exceeds max_same x colours x kinds: no scene can satisfy max_same")
        if self.max_same < 1:
            raise ValueError(f"max_same must be >= 1, got {self.max_same}")
        lo, hi = self.size_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"size_range must satisfy 0 < low <= high <= 1, got {self.size_range}")
        if not 0 <= self.max_occlusion < 1 or self.position_margin < 0 or self.size_ratio < 1 or self.min_cells < 1:
            raise ValueError("need 0 <= max_occlusion < 1, position_margin >= 0, size_ratio >= 1, min_cells >= 1")
        if min(self.colour_jitter, self.background_jitter, self.gradient, self.noise) < 0:
            raise ValueError("colour_jitter, background_jitter, gradient and noise must be >= 0")
        if self.ovd_prompt_order not in PROMPT_ORDERS:
            raise ValueError(f"ovd_prompt_order must be one of {PROMPT_ORDERS}, got {self.ovd_prompt_order!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    @property
    def cell_size(self) -> int:
        """Pixels per merged cell (patch_size * merge_size)."""
        return self.patch_size * self.merge_size

    @property
    def grid(self) -> tuple[int, int]:
        """(grid_h, grid_w) of the stored ``patches``: the released rounded grid."""
        return rounded_grid(self.height, self.width, cell_size=self.cell_size)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# =========================================================================== scenes
@dataclass(frozen=True)
class Shape:
    """A drawn shape: names, pixel box [x1, y1, x2, y2) (the shape touches all four sides) and its fill colour."""

    colour: str
    kind: str
    box: tuple[int, int, int, int]
    fill: tuple[int, int, int]

    def draw(self, draw: ImageDraw.ImageDraw, fill) -> None:
        """Paint the shape with ``fill`` (no anti-aliasing: pixels and masks agree exactly)."""
        x1, y1, x2, y2 = self.box
        if self.kind == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif self.kind == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif self.kind == "triangle":
            draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape kind {self.kind!r}; expected one of {KINDS}")

    def mask(self, height: int, width: int) -> np.ndarray:
        """Full (unoccluded) mask (H, W) uint8 0/1."""
        img = Image.new("L", (width, height), 0)
        self.draw(ImageDraw.Draw(img), 1)
        return np.asarray(img, dtype=np.uint8)


@dataclass(frozen=True)
class ObjectFacts:
    """What the referring-expression semantics look at: names, visible box centre (px) and visible area (px)."""

    colour: str
    kind: str
    cx: float
    cy: float
    area: float


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


# =========================================================================== referring expressions
@dataclass(frozen=True)
class Expression:
    """``the [larger|smaller] COLOUR KIND [on the left|on the right|at the top|at the bottom]``."""

    colour: str
    kind: str
    relation: str | None = None

    def text(self) -> str:
        if self.relation is None:
            return f"the {self.colour} {self.kind}"
        if self.relation in SIZE_RELATIONS:
            return f"the {self.relation} {self.colour} {self.kind}"
        if self.relation in POSITION_PHRASES:
            return f"the {self.colour} {self.kind} {POSITION_PHRASES[self.relation]}"
        raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")


_EXPRESSION = re.compile(
    r"^the (?:(?P<size>larger|smaller) )?(?P<colour>[a-z]+) (?P<kind>[a-z]+)"
    r"(?: (?P<pos>" + "|".join(POSITION_PHRASES.values()) + r"))?$"
)


def parse_expression(text: str) -> Expression:
    """Inverse of :meth:`Expression.text`; ValueError for a sentence outside the grammar."""
    m = _EXPRESSION.match(text)
    if m is None or m["colour"] not in PALETTE or m["kind"] not in KINDS or (m["size"] and m["pos"]):
        raise ValueError(f"not a shapes referring expression: {text!r}")
    relation = m["size"] or {v: k for k, v in POSITION_PHRASES.items()}.get(m["pos"])
    return Expression(m["colour"], m["kind"], relation)


def _beats(a: ObjectFacts, b: ObjectFacts, relation: str, margin_x: float, margin_y: float, ratio: float) -> bool:
    """Does ``a`` hold ``relation`` against ``b`` with a clear margin?"""
    if relation == "left":
        return b.cx - a.cx >= margin_x
    if relation == "right":
        return a.cx - b.cx >= margin_x
    if relation == "top":
        return b.cy - a.cy >= margin_y
    if relation == "bottom":
        return a.cy - b.cy >= margin_y
    if relation == "larger":
        return a.area >= ratio * b.area
    if relation == "smaller":
        return b.area >= ratio * a.area
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def referents(expr: Expression, facts: Sequence[ObjectFacts], config: ShapesConfig) -> list[int]:
    """Indices of the objects an expression picks: those of its colour and kind, and, with a relation, the ones that
    hold it against every other object of that colour and kind (margins from ``config``)."""
    same = [i for i, f in enumerate(facts) if f.colour == expr.colour and f.kind == expr.kind]
    if expr.relation is None:
        return same
    mx, my = config.position_margin * config.width, config.position_margin * config.height
    return [i for i in same
            if all(_beats(facts[i], facts[j], expr.relation, mx, my, config.size_ratio) for j in same if j != i)]


def describe(i: int, facts: Sequence[ObjectFacts], config: ShapesConfig, rng: np.random.Generator) -> Expression | None:
    """An expression whose only referent is object ``i``: ``the COLOUR KIND`` when that is unique, else a random
    relation among those that single it out; None if none does."""
    plain = Expression(facts[i].colour, facts[i].kind)
    if referents(plain, facts, config) == [i]:
        return plain
    valid = [Expression(plain.colour, plain.kind, r) for r in RELATIONS]
    valid = [e for e in valid if referents(e, facts, config) == [i]]
    return valid[int(rng.integers(len(valid)))] if valid else None


# =========================================================================== records
def json_object(obj: SceneObject, task: str, label: str, config: ShapesConfig) -> dict:
    """The released object fields (patches, bbox, iscrowd, area, rle, label) under ``task``'s foreground rule."""
    bbox = normalize_box_xywh(obj.bbox_xywh, config.width, config.height)
    return make_object(list(obj.patches[task]), bbox, 0, obj.area, dict(obj.rle), label)


def prompt_kinds(scene: Scene, split: str, config: ShapesConfig) -> list[str]:
    """OVD category order: shuffled (the scene's seeded order) or the config's kind (= category id) order."""
    shuffle = config.ovd_prompt_order == "shuffle" or (config.ovd_prompt_order == "auto" and split == "train")
    return list(scene.kind_order) if shuffle else list(config.kinds)


def ovd_record(image_id: int, file_name: str, scene: Scene, split: str, config: ShapesConfig) -> dict:
    """OVD: every kind in the prompt; the answer groups objects by kind in prompt order, reading order inside."""
    kinds = prompt_kinds(scene, split, config)
    groups, objects = [], []
    for kind in kinds:
        members = [o for o in scene.objects if o.shape.kind == kind]
        groups.append((kind, len(members)))
        objects.extend(json_object(o, TASK_OVD, kind, config) for o in members)
    return make_record(image_id, file_name, ovd_prompt(kinds), ovd_answer(groups), objects, TASK_OVD)


def referring_records(image_id: int, file_name: str, scene: Scene, config: ShapesConfig) -> list[dict]:
    """REC/RES: one record per object (reading order), the sentence its generated expression."""
    out = []
    for obj in scene.objects:
        sentence = obj.expression
        out.append(make_record(image_id, file_name, rec_prompt(sentence), rec_answer(sentence),
                               [json_object(obj, TASK_REFERRING, sentence, config)], TASK_REFERRING))
    return out


def caption(scene: Scene, with_refs: bool = True) -> str:
    """``A red circle (<|Obj_0|>), a blue square (<|Obj_1|>) and a white triangle (<|Obj_2|>) on a gray
    background.`` (objects in reading order; without ``with_refs`` the placeholders are left out)."""
    phrases = [f"a {o.shape.colour} {o.shape.kind}" + (f" ({obj_placeholder(k)})" if with_refs else "")
               for k, o in enumerate(scene.objects)]
    if not phrases:
        return f"An empty {scene.background} background."
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed[0].upper()}{listed[1:]} on a {scene.background} background."


def ric_record(image_id: int, file_name: str, scene: Scene, config: ShapesConfig) -> dict:
    """RIC: the caption of :func:`caption`, objects in caption order, labels ""."""
    objects = [json_object(o, TASK_RIC, "", config) for o in scene.objects]
    return make_record(image_id, file_name, RIC_PROMPT, caption(scene), objects, TASK_RIC)


def coco_entries(image_id: int, file_name: str, scene: Scene, first_ann_id: int,
                 config: ShapesConfig) -> tuple[dict, list[dict]]:
    """A COCO ``images`` entry and its ``annotations`` (reading order; RLE segmentation; category ids 1.. in
    ``config.kinds`` order; the colour and kind also under ``attributes``)."""
    image = {"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width,
             "background": scene.background}
    anns = []
    for k, obj in enumerate(scene.objects):
        anns.append({
            "id": first_ann_id + k, "image_id": image_id, "category_id": config.kinds.index(obj.shape.kind) + 1,
            "segmentation": dict(obj.rle), "area": obj.area, "bbox": list(obj.bbox_xywh), "iscrowd": 0,
            "attributes": {"colour": obj.shape.colour, "kind": obj.shape.kind, "expression": obj.expression},
        })
    return image, anns


def coco_categories(config: ShapesConfig) -> list[dict]:
    return [{"id": i + 1, "name": kind, "supercategory": "shape"} for i, kind in enumerate(config.kinds)]


def facts_from_coco(ann: Mapping) -> ObjectFacts:
    """ObjectFacts of a COCO annotation written by :func:`coco_entries` (for checking expressions from the files)."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    attrs = ann["attributes"]
    return ObjectFacts(attrs["colour"], attrs["kind"], x + w / 2, y + h / 2, float(ann["area"]))


# =========================================================================== writing
def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``: independent streams per (seed, split, index)."""
    if split not in SPLIT_STREAMS:
        raise ValueError(f"split must be one of {tuple(SPLIT_STREAMS)}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    return np.random.default_rng([seed, SPLIT_STREAMS[split], index])


def split_files(split: str) -> dict[str, str]:
    """File names (relative to the output folder) of one split."""
    return {"refer": f"refer_{split}.jsonl", "ovd": f"ovd_{split}.jsonl", "ric": f"ric_{split}.jsonl",
            "coco": f"coco_{split}.json", "captions": f"ric_{split}_captions.json"}


def _write_json(data, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        json.dump(data, f)
        f.write("\n")
    os.replace(tmp, path)


def _image_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.png"


def _draw_scene(images_dir: Path, split: str, seed: int, config: ShapesConfig, index: int) -> Scene:
    """Sample scene ``index`` of ``split``, write its image into ``images_dir`` and return it (the per-scene work of
    :func:`generate_split`, run in worker processes when it has several)."""
    scene = sample_scene(scene_rng(seed, split, index), config)
    render_scene(scene, config.noise).save(images_dir / _image_name(split, index), format="PNG", compress_level=1)
    return scene


def _drawn_scenes(images_dir: Path, split: str, num_images: int, seed: int, config: ShapesConfig,
                  workers: int) -> Iterator[Scene]:
    """Scenes ``0 .. num_images - 1`` of ``split`` in order, drawn by ``workers`` processes (each scene has its own
    generator, so the result does not depend on the count). Spawned, not forked: the caller may hold torch's threads."""
    draw = partial(_draw_scene, images_dir, split, seed, config)
    if workers == 1 or num_images < 2:
        yield from map(draw, range(num_images))
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, num_images)) as pool:
        yield from pool.imap(draw, range(num_images), chunksize=max(1, min(64, num_images // (4 * workers))))


def generate_split(out_dir: str | os.PathLike, split: str, num_images: int, seed: int, config: ShapesConfig,
                   progress: bool = False, workers: int = 1) -> dict:
    """Write ``num_images`` scenes of ``split``: ``images/{split}_{i:06d}.png`` (image id i + 1) and the files of
    :func:`split_files`, sampling and drawing the scenes in ``workers`` processes. Returns the split's counts. Same
    arguments (any ``workers``) -> byte-identical files."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    refer, ovd, ric, images, anns, captions = [], [], [], [], [], []
    scenes = _drawn_scenes(out / "images", split, num_images, seed, config, workers)
    for i, scene in enumerate(tqdm(scenes, total=num_images, desc=f"shapes {split}", unit="img",
                                   disable=not progress)):
        image_id, file_name = i + 1, _image_name(split, i)
        refer.extend(referring_records(image_id, file_name, scene, config))
        ovd.append(ovd_record(image_id, file_name, scene, split, config))
        ric.append(ric_record(image_id, file_name, scene, config))
        image, image_anns = coco_entries(image_id, file_name, scene, len(anns) + 1, config)
        images.append(image)
        anns.extend(image_anns)
        captions.append({"id": image_id, "image_id": image_id, "caption": caption(scene, with_refs=False)})
    files = split_files(split)
    write_jsonl(refer, out / files["refer"])
    write_jsonl(ovd, out / files["ovd"])
    write_jsonl(ric, out / files["ric"])
    info = {"description": f"padt shapes, split {split}, seed {seed}"}
    _write_json({"info": info, "images": images, "annotations": anns, "categories": coco_categories(config)},
                out / files["coco"])
    _write_json({"info": info, "images": [{k: im[k] for k in ("id", "file_name", "height", "width")} for im in images],
                 "annotations": captions}, out / files["captions"])
    return {"images": num_images, "objects": len(anns), "refer_records": len(refer), "ovd_records": len(ovd),
            "ric_records": len(ric)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generate_dataset(out_dir: str | os.PathLike, counts: Mapping[str, int], seed: int = 0,
                     config: ShapesConfig | None = None, progress: bool = False, workers: int = 1) -> dict:
    """Write every split of ``counts`` ({split: num_images}; splits with 0 images are left out) and
    ``manifest.json`` (seed, options, counts, processor pixel limits, SHA-256 of every written file), drawing scenes
    in ``workers`` processes (the files do not depend on it). Returns the manifest."""
    config = config or ShapesConfig()
    unknown = [s for s in counts if s not in SPLIT_STREAMS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected names from {tuple(SPLIT_STREAMS)}")
    if any(n < 0 for n in counts.values()) or not any(counts.values()):
        raise ValueError(f"image counts must be >= 0 with at least one positive, got {dict(counts)}")
    out = Path(out_dir)
    splits, hashes = {}, {}
    for split, n in counts.items():
        if n == 0:
            continue
        splits[split] = generate_split(out, split, n, seed, config, progress, workers)
        names = list(split_files(split).values()) + [f"images/{_image_name(split, i)}" for i in range(n)]
        hashes.update({name: _sha256(out / name) for name in names})
    pixels = config.grid[0] * config.grid[1] * config.cell_size**2
    manifest = {
        "generator": "padt.shapes.benchmark", "seed": seed, "splits": splits,
        "streams": {s: f"numpy.random.default_rng([{seed}, {SPLIT_STREAMS[s]}, image_index])" for s in splits},
        "options": config.to_dict(), "grid": list(config.grid),
        "processor": {"patch_size": config.patch_size, "merge_size": config.merge_size, "min_pixels": pixels,
                      "max_pixels": pixels},
        "categories": coco_categories(config), "files": dict(sorted(hashes.items())),
    }
    _write_json(manifest, out / "manifest.json")
    return manifest
