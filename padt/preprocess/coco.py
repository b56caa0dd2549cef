"""COCO-format instances -> OVD records (the authors' ``process_coco.py`` semantics, seeded and counted).

Per image: categories with more than ``max_per_class`` instances leave the prompt and the answer; in training mode
the category order is shuffled (one list, shuffled in place image after image) and, with probability ``drop_rate``,
the first ``max_absent_dropped`` shuffled categories *absent* from the image leave the prompt; present categories
always stay. The answer lists the present prompt categories in prompt order, objects in annotation order.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from padt.geometry.masks import ForegroundRule
from padt.io import load_json
from padt.preprocess.common import GridSpec, Skip, image_size
from padt.preprocess.objects import object_from_annotation
from padt.preprocess.skips import SkipReport
from padt.preprocess.templates import TASK_OVD, make_record, ovd_answer, ovd_prompt


@dataclass
class CocoIndex:
    """The parts of a COCO instances file we use; ``images`` and each annotation list keep file order."""

    path: Path
    images: list[dict]
    annotations: dict[int, dict]
    anns_by_image: dict[int, list[dict]]
    categories: list[dict]  # sorted by id
    orphan_annotations: int


def load_coco_instances(path: str | os.PathLike, what: str = "COCO instances file") -> CocoIndex:
    """Load and index a COCO-format file; structural problems raise ValueError naming the file and the entry."""
    data = load_json(path, what)
    if not isinstance(data, dict):
        raise TypeError(f"{what} {path}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise TypeError(f"{what} {path}: missing or non-list '{key}'")
    images = data["images"]
    ids = set()
    for i, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise ValueError(f"{what} {path}: images[{i}] needs 'id' and 'file_name'")
        if img["id"] in ids:
            raise ValueError(f"{what} {path}: duplicate image id {img['id']!r}")
        ids.add(img["id"])
    categories = []
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
            raise ValueError(f"{what} {path}: categories[{i}] needs 'id' and a string 'name'")
        categories.append(cat)
    if len({c["id"] for c in categories}) != len(categories):
        raise ValueError(f"{what} {path}: duplicate category ids")
    categories.sort(key=lambda c: c["id"])
    annotations, by_image, orphans = {}, defaultdict(list), 0
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"{what} {path}: annotations[{i}] needs 'image_id'")
        if "id" in ann:
            annotations[ann["id"]] = ann
        if ann["image_id"] in ids:
            by_image[ann["image_id"]].append(ann)
        else:
            orphans += 1
    return CocoIndex(Path(path), images, annotations, dict(by_image), categories, orphans)


@dataclass(frozen=True)
class OVDOptions:
    """The authors' OVD limits. ``shuffle``: training prompt order (else category-id order)."""

    shuffle: bool
    drop_rate: float = 0.0
    max_absent_dropped: int | None = None  # None: half of the categories (40 for COCO's 80)
    max_per_class: int = 50
    max_classes_in_prompt: int = 100
    max_side: int | None = 1288
    keep_crowd: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {self.drop_rate}")
        if self.max_per_class < 1 or self.max_classes_in_prompt < 1:
            raise ValueError("max_per_class and max_classes_in_prompt must be >= 1")


def ovd_records(
    coco: CocoIndex,
    *,
    options: OVDOptions,
    grid: GridSpec,
    rule: ForegroundRule,
    rng: np.random.Generator,
    report: SkipReport,
    image_root: str | os.PathLike | None = None,
    progress: bool = False,
) -> Iterator[dict]:
    """Yield one OVD record per usable image, in file order; everything left out is counted in ``report``."""
    names = {c["id"]: c["name"] for c in coco.categories}
    order = [c["id"] for c in coco.categories]
    n_drop = options.max_absent_dropped if options.max_absent_dropped is not None else len(order) // 2
    if coco.orphan_annotations:
        report.note("annotation of an image id not in 'images' (ignored)", coco.orphan_annotations)
    for img in tqdm(coco.images, desc=f"ovd {coco.path.name}", unit="img", disable=not progress):
        try:
            record = _ovd_record(img, coco, names, order, n_drop, options, grid, rule, rng, report, image_root)
        except Skip as skip:
            report.skip_record(skip.reason)
            continue
        report.written += 1
        yield record


def _ovd_record(img, coco, names, order, n_drop, options, grid, rule, rng, report, image_root) -> dict:
    file_name = img["file_name"]
    height, width = image_size(img, image_root, file_name)
    if options.max_side and max(height, width) > options.max_side:
        raise Skip(f"image side over --max-side ({options.max_side} px)")
    grid_hw = grid.grid(height, width)

    anns_by_cat: dict = defaultdict(list)
    for ann in coco.anns_by_image.get(img["id"], []):
        if ann.get("category_id") not in names:
            report.drop_object("annotation with an unknown category_id")
        elif ann.get("iscrowd", 0) and not options.keep_crowd:
            report.drop_object("crowd region (--drop-crowd)")
        else:
            anns_by_cat[ann["category_id"]].append(ann)
    counts = Counter({c: len(a) for c, a in anns_by_cat.items()})
    over = {c for c, n in counts.items() if n > options.max_per_class}
    for c in sorted(over):
        report.drop_object(f"category over --max-per-class ({options.max_per_class}) in the image", counts[c])
    present = set(counts) - over

    if options.shuffle:
        rng.shuffle(order)  # in place, cumulative over images (the authors' semantics)
    # The coin is drawn whenever the order is shuffled, so --drop-rate does not change the prompt orders.
    coin = rng.random() if options.shuffle or options.drop_rate > 0 else 1.0
    candidates = [c for c in order if c not in over]
    if coin < options.drop_rate:
        dropped = set([c for c in candidates if c not in present][:n_drop])
        candidates = [c for c in candidates if c not in dropped]
    prompt_cats = candidates[: options.max_classes_in_prompt]
    for c in candidates[options.max_classes_in_prompt:]:
        if c in present:
            report.drop_object("category cut by --max-classes-in-prompt", counts[c])
    if not prompt_cats:
        raise Skip("no category left for the prompt")

    objects, groups = [], []
    for c in prompt_cats:
        kept = []
        for ann in anns_by_cat.get(c, []) if c in present else []:
            obj, reason = object_from_annotation(
                ann, height=height, width=width, grid_hw=grid_hw, grid=grid, rule=rule, label=names[c], report=report
            )
            if obj is None:
                report.drop_object(reason)
            else:
                kept.append(obj)
        if kept:
            groups.append((names[c], len(kept)))
            objects.extend(kept)
    prompt = ovd_prompt([names[c] for c in prompt_cats])
    return make_record(img["id"], file_name, prompt, ovd_answer(groups), objects, TASK_OVD)
