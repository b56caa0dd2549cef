"""Evaluation samples read from the released JSONL records (docs/preprocessing.md) and accessors for their ground
truth.

A record: ``{"id", "image", "conversations": [{"from": "human", "value": prompt}], "answer_template",
"objects": [{"bbox": normalised xyxy, "rle", "label", "area", "iscrowd", ...}], "task"}``.

One sample per record for REC / RES / OVD. For RIC the released files may hold several captions of one image; the
model is asked once per image, so a sample groups every record of its image (its captions are the references and
the union of their objects is the grounding ground truth).  A sample's `index` (its position in the list) is the
key of its prediction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from padt.io import iter_jsonl, load_json
from padt.preprocess.templates import TASK_OVD, TASK_REFERRING, TASK_RIC

TASKS = ("rec", "res", "ovd", "ric")
# the `task` field of the released records for each evaluation task
RECORD_TASK = {"rec": TASK_REFERRING, "res": TASK_REFERRING, "ovd": TASK_OVD, "ric": TASK_RIC}


@dataclass
class EvalSample:
    """One model call: an image, a prompt, and the record(s) holding its ground truth."""

    index: int
    records: list[dict]
    image_path: Path
    prompt: str
    extra: dict = field(default_factory=dict)

    @property
    def record(self) -> dict:
        return self.records[0]

    @property
    def image_id(self):
        return self.record.get("id", self.record["image"])


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file (one object per line) or of a JSON file holding a list of them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
    if head == "[":
        records = load_json(path, "evaluation data file")
    else:
        records = [obj for _, obj in iter_jsonl(path, "evaluation data file")]
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise TypeError(f"{path}: record {i} is a {type(rec).__name__}, expected a JSON object")
    return records


def record_prompt(record: dict, where: str) -> str:
    """The human turn of a record's `conversations`."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv or not isinstance(conv[0], dict) or "value" not in conv[0]:
        raise ValueError(f"{where}: 'conversations' must be a list whose first turn has a 'value' (the prompt)")
    return str(conv[0]["value"])


def load_samples(
    path: str | os.PathLike, images_dir: str | os.PathLike, task: str, limit: int | None = None
) -> list[EvalSample]:
    """Evaluation samples of one data file, in file order (RIC: one per image, in order of first appearance).

    Raises ValueError for a record without image / prompt, or whose `task` field belongs to another task.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    records = read_records(path)
    images_dir = Path(images_dir)
    groups: dict[object, list[dict]] = {}
    order: list[object] = []
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        if "image" not in rec:
            raise ValueError(f"{where} has no 'image' (file name under --images)")
        record_prompt(rec, where)
        kind = rec.get("task")
        if kind is not None and kind != RECORD_TASK[task]:
            raise ValueError(f"{where} is a {kind!r} record, but --task {task} expects {RECORD_TASK[task]!r} records "
                             f"(is this the right file for this task?)")
        key = (rec.get("id"), rec["image"]) if task == "ric" else i
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(rec)
    samples = []
    for index, key in enumerate(order[:limit] if limit else order):
        recs = groups[key]
        samples.append(EvalSample(index, recs, images_dir / recs[0]["image"], record_prompt(recs[0], str(path))))
    return samples


def image_wh(sample: EvalSample, pred: dict | None) -> tuple[int, int]:
    """(width, height) of the sample's original image: from a ground-truth RLE's size, else the prediction's
    `image_size`, else the image file's header (in the upright frame: EXIF orientations 5-8 swap the sides)."""
    for rec in sample.records:
        for obj in rec.get("objects") or []:
            rle = obj.get("rle")
            if isinstance(rle, dict) and "size" in rle:
                h, w = rle["size"]
                return int(w), int(h)
    if pred is not None and pred.get("image_size"):
        w, h = pred["image_size"]
        return int(w), int(h)
    from padt.geometry.images import upright_size

    return upright_size(sample.image_path)  # the upright frame (EXIF orientation applied), as the predictor sees it


def referred_object(sample: EvalSample) -> dict:
    """The single ground-truth object of a REC/RES record."""
    objs = sample.record.get("objects") or []
    if not objs:
        raise ValueError(f"sample {sample.index} (image {sample.record['image']}) has no ground-truth object")
    return objs[0]
