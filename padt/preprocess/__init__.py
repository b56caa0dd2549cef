"""Raw annotations -> PaDT training JSONL (the released format, docs/preprocessing.md).

Library behind the scripts in ``src/preprocess/``: COCO (OVD), RefCOCO/+/g (REC/RES), RIC, and the converters for a
user's own COCO-format or referring data. See docs/preprocessing.md.
"""

from padt.io import iter_jsonl, load_json, write_jsonl
from padt.preprocess.coco import CocoIndex, OVDOptions, load_coco_instances, ovd_records
from padt.preprocess.common import GridSpec, Skip
from padt.preprocess.custom import referring_jsonl_records
from padt.preprocess.refcoco import DEFAULT_SPLIT_BY, DEFAULT_SPLITS, refer_records
from padt.preprocess.refer import ReferDataset, load_plain_pickle
from padt.preprocess.ric import caption_to_template, repair_tags, ric_records
from padt.preprocess.skips import SkipReport

__all__ = [
    "DEFAULT_SPLITS",
    "DEFAULT_SPLIT_BY",
    "CocoIndex",
    "GridSpec",
    "OVDOptions",
    "ReferDataset",
    "Skip",
    "SkipReport",
    "caption_to_template",
    "iter_jsonl",
    "load_coco_instances",
    "load_json",
    "load_plain_pickle",
    "ovd_records",
    "refer_records",
    "referring_jsonl_records",
    "repair_tags",
    "ric_records",
    "write_jsonl",
]
