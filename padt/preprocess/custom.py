"""A user's own referring data (minimal JSONL) -> REC/RES records.

One JSON object per line::

    {"image": "kitchen/0001.jpg", "sentence": "the red mug left of the sink", "bbox": [12, 40, 96, 130]}
    {"image": "kitchen/0002.jpg", "sentences": ["the dog", "brown dog on the sofa"],
     "mask": {"size": [480, 640], "counts": "..."}, "height": 480, "width": 640, "id": 17}

* ``image`` (required): path relative to ``--image-root``; it is the record's ``image`` field.
* ``sentence`` (string) or ``sentences`` (list of strings), required: one record per sentence.
* ``bbox``: pixel box, [x1, y1, x2, y2] (or [x, y, w, h] with ``bbox_format="xywh"``).
* ``mask``: COCO RLE (compressed string or uncompressed list ``counts``) or COCO polygons ``[[x0, y0, ...], ...]``.
  At least one of ``bbox``/``mask`` is needed; a missing bbox is the mask's tight box, a missing mask gives
  box-shaped cells and no ``rle`` (box-only data trains REC but not RES).
* ``height``/``width``: optional, read from the image file when absent.
* ``id``: optional, defaults to the 1-based line number.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from tqdm import tqdm

from padt.geometry.masks import ForegroundRule
from padt.io import iter_jsonl
from padt.preprocess.common import GridSpec, Skip, image_size
from padt.preprocess.objects import object_from_geometry
from padt.preprocess.refcoco import referring_record
from padt.preprocess.skips import SkipReport

BBOX_FORMATS = ("xyxy", "xywh")


def _sentences(row: dict) -> list:
    if "sentences" in row:
        sents = row["sentences"]
        if not isinstance(sents, list):
            raise Skip("'sentences' is not a list")
        if not sents:
            raise Skip("empty 'sentences' list")
        return sents
    if "sentence" in row:
        return [row["sentence"]]
    raise Skip("line without 'sentence' or 'sentences'")


def _box_xywh(box, bbox_format: str):
    if box is None:
        return None
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise Skip("malformed bbox")
    if bbox_format == "xywh":
        return [float(v) for v in box]
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise Skip("bbox with x2 < x1 or y2 < y1 (is it xywh? use --bbox-format xywh)")
    return [x1, y1, x2 - x1, y2 - y1]


def referring_jsonl_records(
    path: str | os.PathLike,
    *,
    grid: GridSpec,
    rule: ForegroundRule,
    report: SkipReport,
    image_root: str | os.PathLike | None = None,
    bbox_format: str = "xyxy",
    progress: bool = False,
) -> Iterator[dict]:
    """Yield REC/RES records from a minimal referring JSONL, one per sentence, in file order."""
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}")
    for lineno, row in tqdm(iter_jsonl(path, "referring JSONL"), desc="referring", unit="line", disable=not progress):
        sentences = row.get("sentences") if isinstance(row, dict) else None
        n = max(1, len(sentences)) if isinstance(sentences, list) else 1  # a skipped line counts at least once
        try:
            if not isinstance(row, dict):
                raise Skip("line is not a JSON object")
            if not isinstance(row.get("image"), str) or not row["image"]:
                raise Skip("line without 'image'")
            sentences = _sentences(row)
            height, width = image_size(row, image_root, row["image"])
            grid_hw = grid.grid(height, width)
            if row.get("mask") is None and row.get("bbox") is None:
                raise Skip("line without 'bbox' or 'mask'")
            obj, reason = object_from_geometry(
                segmentation=row.get("mask"), bbox_xywh=_box_xywh(row.get("bbox"), bbox_format), height=height,
                width=width, grid_hw=grid_hw, grid=grid, rule=rule, label="", report=report,
            )
            if obj is None:
                raise Skip(reason)
        except Skip as skip:
            report.skip_record(skip.reason, n)
            continue
        image_id = row.get("id", lineno)
        for sentence in sentences:
            if not isinstance(sentence, str) or not sentence.strip():
                report.skip_record("empty or non-string sentence")
                continue
            report.written += 1
            yield referring_record(image_id, row["image"], sentence, obj)
