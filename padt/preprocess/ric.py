"""RIC (referring image captioning): COCO-format files whose images carry ``captions`` with ``<box_id: ANN_ID/>``
tags -> one record per caption, each kept tag replaced by ``<|Obj_k|>`` (k in kept order).

Tag repairs (each counted as a note): a missing closing bracket, junk before the id (``<box_id: #12/>``),
comma-joined ids (``<box_id: 1, 2/>``), adjacent tags without a separator, and bare ids in parentheses
(``(123)``, only when every number is an annotation id of the image). Tags whose annotation is not in the image or
has no foreground cell are removed together with a neighbouring ", " or the emptied "( )"; remaining "(...box_id...)"
groups are stripped. A caption that still contains "box_id" after all this is skipped, never written half-repaired.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence

from tqdm import tqdm

from padt.geometry.masks import ForegroundRule
from padt.preprocess.coco import CocoIndex
from padt.preprocess.common import GridSpec, Skip, image_size
from padt.preprocess.objects import object_from_annotation
from padt.preprocess.skips import SkipReport
from padt.preprocess.templates import RIC_PROMPT, TASK_RIC, make_record, obj_placeholder

DEFAULT_CAPTION_ENDINGS = (".", '"', "\u201d")

_LOOSE_TAG = re.compile(r"<\s*box[_ ]?id\s*:?\s*(?P<body>[^<>/()]*?)\s*(?P<end>/\s*>|/|>|(?=\)))", re.IGNORECASE)
_ADJACENT = re.compile(r"(<box_id: \d+/>)\s*(?=<box_id: \d+/>)")
_BARE_IDS = re.compile(r"\(\s*(\d+(?:\s*,\s*\d+)*)\s*\)")
_TAG = re.compile(r"<box_id: (\d+)/>")
_DROP = "\x00"
_BAD = "\x01"
_EMPTY_PARENS = re.compile(r"\s*\(\s*\)")
_BAD_GROUP = re.compile(r"\s*\([^()]*box[_ ]?id[^()]*\)", re.IGNORECASE)
_LEFTOVER = re.compile(r"box[_ ]?id", re.IGNORECASE)


def _canonical(ids: Sequence[int | str]) -> str:
    return ", ".join(f"<box_id: {int(i)}/>" for i in ids)


def repair_tags(caption: str, image_ann_ids: set, report: SkipReport | None = None) -> str:
    """Rewrite every tag of ``caption`` into the canonical ``<box_id: N/>`` form (a tag without any id becomes an
    internal marker that :func:`caption_to_template` removes)."""

    def note(reason: str) -> None:
        if report is not None:
            report.note(reason)

    def fix(m: re.Match) -> str:
        body, end = m.group("body"), m.group("end")
        ids = re.findall(r"\d+", body)
        if not ids:
            note("tag without an id removed")
            return _BAD
        if end.replace(" ", "") != "/>":
            note("tag repaired: missing closing bracket")
        if len(ids) > 1:
            note("tag repaired: comma-joined ids split")
        if re.sub(r"[\d,\s]", "", body):
            note("tag repaired: junk around the id removed")
        return _canonical(ids)

    text = _LOOSE_TAG.sub(fix, caption)
    text, n = _ADJACENT.subn(r"\1, ", text)
    if n:
        note("tag repaired: adjacent tags separated")

    def bare(m: re.Match) -> str:
        ids = re.findall(r"\d+", m.group(1))
        if all(int(i) in image_ann_ids for i in ids):
            note("bare annotation id in parentheses turned into a tag")
            return f"({_canonical(ids)})"
        return m.group(0)

    return _BARE_IDS.sub(bare, text)


def caption_to_template(
    caption: str,
    resolve: Callable[[int], tuple[dict | None, str | None]],
    image_ann_ids: set,
    report: SkipReport,
) -> tuple[str, list[dict]]:
    """Caption with tags -> (answer_template with ``<|Obj_k|>``, objects in k order).

    ``resolve(ann_id)`` returns (object, None) or (None, reason). Raises Skip if a tag cannot be repaired.
    """
    text = repair_tags(caption, image_ann_ids, report)
    objects: list[dict] = []

    def place(m: re.Match) -> str:
        ann_id = int(m.group(1))
        if ann_id not in image_ann_ids:
            report.drop_object("tag: annotation id not in this image")
            return _DROP
        obj, reason = resolve(ann_id)
        if obj is None:
            report.drop_object(f"tag: {reason}")
            return _DROP
        objects.append(dict(obj))
        return obj_placeholder(len(objects) - 1)

    text = _TAG.sub(place, text)
    for marker in (_DROP, _BAD):
        text = re.sub(r"\s*,\s*" + marker, "", text)
        text = re.sub(marker + r"\s*,\s*", "", text)
        text = text.replace(marker, "")
    text = _EMPTY_PARENS.sub("", text)
    text, n = _BAD_GROUP.subn("", text)
    if n:
        report.note("malformed (box_id...) group stripped", n)
    text = text.strip()
    if _LEFTOVER.search(text):
        raise Skip("caption with an unrepairable box_id tag")
    return text, objects


class _ImageObjects:
    """Objects of one image's annotations, built on first use and cached (a caption may cite an id twice)."""

    def __init__(self, anns: dict, height: int, width: int, grid: GridSpec, rule: ForegroundRule,
                 report: SkipReport) -> None:
        self.anns, self.height, self.width, self.grid, self.rule, self.report = anns, height, width, grid, rule, report
        self.grid_hw = grid.grid(height, width)
        self.cache: dict[int, tuple[dict | None, str | None]] = {}

    def __call__(self, ann_id: int) -> tuple[dict | None, str | None]:
        if ann_id not in self.cache:
            self.cache[ann_id] = object_from_annotation(
                self.anns[ann_id], height=self.height, width=self.width, grid_hw=self.grid_hw, grid=self.grid,
                rule=self.rule, label="", report=self.report,
            )
        return self.cache[ann_id]


def ric_records(
    coco: CocoIndex,
    *,
    grid: GridSpec,
    rule: ForegroundRule,
    report: SkipReport,
    caption_endings: Sequence[str] = DEFAULT_CAPTION_ENDINGS,
    max_side: int | None = None,
    image_root: str | os.PathLike | None = None,
    progress: bool = False,
) -> Iterator[dict]:
    """Yield one RIC record per usable caption, images in file order, captions in list order."""
    endings = tuple(caption_endings)
    for img in tqdm(coco.images, desc=f"ric {coco.path.name}", unit="img", disable=not progress):
        captions = img.get("captions")
        if not isinstance(captions, list) or not captions:
            report.note("image without captions")
            continue
        try:
            height, width = image_size(img, image_root, img["file_name"])
            if max_side and max(height, width) > max_side:
                raise Skip(f"image side over --max-side ({max_side} px)")
            anns = {a["id"]: a for a in coco.anns_by_image.get(img["id"], []) if "id" in a}
            resolve = _ImageObjects(anns, height, width, grid, rule, report)
        except Skip as skip:
            report.skip_record(skip.reason, len(captions))
            continue
        for caption in captions:
            if not isinstance(caption, str):
                report.skip_record("caption is not a string")
                continue
            if not caption.rstrip().endswith(endings):
                report.skip_record("caption does not end with '.' or a closing quote")
                continue
            try:
                template, objects = caption_to_template(caption, resolve, set(anns), report)
            except Skip as skip:
                report.skip_record(skip.reason)
                continue
            report.written += 1
            yield make_record(img["id"], img["file_name"], RIC_PROMPT, template, objects, TASK_RIC)
