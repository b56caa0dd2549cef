"""OVD ground truth and COCO result dicts.

Ground truth, in order of preference:

1. the official annotations (``--annotations instances_val2017.json``): the standard COCO numbers, restricted to
   the evaluated images;
2. otherwise the preprocessed records, as the authors' ``eval/evaluation_scripts/eval_coco.py`` did
   (docs/evaluation.md#metrics-and-protocols): per object, bbox = the normalised box x the original size, rounded
   (``[round(x1 W), round(y1 H), round((x2 - x1) W), round((y2 - y1) H)]``), ``area`` and ``iscrowd`` from the
   record, segmentation = the record's RLE. Categories come from the prompts' category lists and the objects'
   labels, numbered in order of first appearance (official ids when annotations are given).

Detections: one per predicted object, ``category_id`` from the lower-cased label (objects with a label that is not
a category are counted and reported, not silently dropped), bbox in the authors' convention
(`padt.evaluation.metrics.boxes.authors_box_xywh`), ``score``, and ``segmentation`` = the predicted mask's RLE.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from padt.evaluation.data import EvalSample, image_wh
from padt.evaluation.metrics.boxes import authors_box_xywh
from padt.preprocess.templates import OVD_PROMPT_PREFIX


def prompt_categories(prompt: str) -> list[str]:
    """Category names of an OVD prompt (``... objects: ["a", "b"].``); [] for any other prompt."""
    if not prompt.startswith(OVD_PROMPT_PREFIX):
        return []
    body = prompt[len(OVD_PROMPT_PREFIX):].rstrip().removesuffix(".")
    try:
        names = json.loads(body)
    except json.JSONDecodeError:
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def categories_from_samples(samples: Sequence[EvalSample]) -> list[dict]:
    """COCO categories ``[{"id", "name"}]`` from the prompts and ground-truth labels, ids 1.. by first appearance."""
    names: dict[str, None] = {}
    for s in samples:
        for name in prompt_categories(s.prompt):
            names.setdefault(name.lower())
        for rec in s.records:
            for obj in rec.get("objects") or []:
                if obj.get("label"):
                    names.setdefault(str(obj["label"]).lower())
    return [{"id": i + 1, "name": n} for i, n in enumerate(names)]


def gt_from_records(samples: Sequence[EvalSample], preds: Mapping[int, dict], categories: Sequence[dict]) -> dict:
    """A COCO dataset dict built from the preprocessed records (the authors' ground truth)."""
    name_to_id = {c["name"]: c["id"] for c in categories}
    images, anns = [], []
    seen: set = set()
    for s in samples:
        if s.image_id in seen:
            raise ValueError(f"image id {s.image_id} appears in two OVD records; expected one record per image")
        seen.add(s.image_id)
        w, h = image_wh(s, preds.get(s.index))
        images.append({"id": s.image_id, "width": w, "height": h, "file_name": s.record["image"]})
        for obj in s.record.get("objects") or []:
            x1, y1, x2, y2 = (float(v) for v in obj["bbox"])
            box = [round(x1 * w), round(y1 * h), round((x2 - x1) * w), round((y2 - y1) * h)]
            ann = {"id": len(anns) + 1, "image_id": s.image_id, "category_id": name_to_id[str(obj["label"]).lower()],
                   "bbox": box, "area": float(obj.get("area", box[2] * box[3])),
                   "iscrowd": int(obj.get("iscrowd", 0))}
            if isinstance(obj.get("rle"), dict):
                ann["segmentation"] = obj["rle"]
            anns.append(ann)
    return {"images": images, "annotations": anns, "categories": list(categories)}


def load_official(path: str | os.PathLike):
    """`pycocotools.coco.COCO` of an official annotation file (quietly)."""
    from pycocotools.coco import COCO

    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@dataclass
class Detections:
    """COCO result dicts and what could not be turned into one."""

    results: list[dict]
    unknown_labels: dict[str, int]
    without_mask: int


def detections(samples: Sequence[EvalSample], preds: Mapping[int, dict], name_to_id: Mapping[str, int]) -> Detections:
    """One COCO result per predicted object (no score threshold, NMS or top-k: COCOeval keeps the best 100)."""
    out, unknown, no_mask = [], {}, 0
    for s in samples:
        pred = preds.get(s.index)
        if pred is None:
            continue
        w, h = image_wh(s, pred)
        for obj in pred["objects"]:
            label = str(obj["label"]).lower()
            if label not in name_to_id:
                unknown[label] = unknown.get(label, 0) + 1
                continue
            det = {"image_id": s.image_id, "category_id": name_to_id[label],
                   "bbox": authors_box_xywh(obj["box_cxcywh"], w, h), "score": float(obj["score"])}
            if obj.get("mask_rle") is not None:
                det["segmentation"] = obj["mask_rle"]
            else:
                no_mask += 1
            out.append(det)
    return Detections(out, unknown, no_mask)

