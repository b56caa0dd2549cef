"""REFER refs -> REC/RES records: one line per (ref, sentence), the referred object with its mask and box."""

from __future__ import annotations

import os
from collections.abc import Iterator

from tqdm import tqdm

from padt.geometry.masks import ForegroundRule
from padt.preprocess.common import GridSpec, Skip, image_size
from padt.preprocess.objects import object_from_annotation
from padt.preprocess.refer import ReferDataset
from padt.preprocess.skips import SkipReport
from padt.preprocess.templates import TASK_REFERRING, make_record, rec_answer, rec_prompt

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
DEFAULT_SPLITS = {
    "refcoco": ("train", "val", "testA", "testB"),
    "refcoco+": ("train", "val", "testA", "testB"),
    "refcocog": ("train", "val", "test"),
}


def referring_record(image_id, file_name: str, sentence: str, obj: dict) -> dict:
    """A REC/RES record for one sentence; ``obj`` is copied with ``label`` set to the sentence."""
    obj = dict(obj)
    obj["label"] = sentence
    return make_record(image_id, file_name, rec_prompt(sentence), rec_answer(sentence), [obj], TASK_REFERRING)


def refer_records(
    refer: ReferDataset,
    split: str,
    *,
    grid: GridSpec,
    rule: ForegroundRule,
    report: SkipReport,
    sentence_field: str = "sent",
    image_root: str | os.PathLike | None = None,
    progress: bool = False,
) -> Iterator[dict]:
    """Yield the records of one split in ref order; a ref without a usable object skips all its sentences."""
    refs = refer.refs_for_split(split)
    if not refs:
        raise ValueError(
            f"{refer.name} ({refer.split_by}) has no refs in split {split!r}; splits present: {refer.split_names()}"
        )
    for ref in tqdm(refs, desc=f"{refer.name} {split}", unit="ref", disable=not progress):
        sentences = ref["sentences"]
        if not sentences:
            report.note("ref without sentences")
            continue
        try:
            img = refer.images.get(ref["image_id"])
            if img is None:
                raise Skip("ref image missing from instances.json")
            ann = refer.annotations.get(ref["ann_id"])
            if ann is None:
                raise Skip("ref annotation missing from instances.json")
            height, width = image_size(img, image_root, img["file_name"])
            grid_hw = grid.grid(height, width)
            obj, reason = object_from_annotation(
                ann, height=height, width=width, grid_hw=grid_hw, grid=grid, rule=rule, label="", report=report
            )
            if obj is None:
                raise Skip(reason)
        except Skip as skip:
            report.skip_record(skip.reason, len(sentences))
            continue
        for sent in sentences:
            text = sent.get(sentence_field) if isinstance(sent, dict) else None
            if not isinstance(text, str) or not text.strip():
                report.skip_record(f"sentence without a non-empty '{sentence_field}'")
                continue
            report.written += 1
            yield referring_record(img["id"], img["file_name"], text, obj)
