"""COCO detection / instance-segmentation mAP through pycocotools (`COCOeval`), on in-memory data.

Detections are COCO result dicts: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` plus
``"segmentation"`` (an RLE at the image size) for ``segm``.  Ground truth is a COCO dataset dict (``images``,
``annotations``, ``categories``) or a loaded ``pycocotools.coco.COCO``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence

from padt.geometry.masks import as_bytes_rle

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def _coco_api():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:  # pragma: no cover - pycocotools is a dependency of the eval extra
        raise ImportError("COCO mAP needs pycocotools: pip install pycocotools") from err
    return COCO, COCOeval


def coco_from_dataset(dataset: dict) -> object:
    """A `pycocotools.coco.COCO` built from a dataset dict (RLE counts may be text), without its console output."""
    COCO, _ = _coco_api()
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"COCO ground truth needs an {key!r} list, got keys {sorted(dataset)}")
    data = copy.copy(dataset)
    data["annotations"] = [_with_bytes_rle(a) for a in dataset["annotations"]]
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _with_bytes_rle(ann: dict) -> dict:
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        return {**ann, "segmentation": as_bytes_rle(seg)}
    return ann


def coco_map(
    gt, detections: Sequence[dict], iou_types: Sequence[str] = IOU_TYPES, img_ids: Sequence[int] | None = None,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """COCOeval summary statistics per IoU type.

    Args:
        gt: a COCO dataset dict or a loaded `COCO` object.
        detections: result dicts (see module docstring); for "segm" each needs a "segmentation" RLE.
        iou_types: any of "bbox", "segm".
        img_ids: restrict the evaluation to these images (default: every image of `gt`).
        verbose: print COCOeval's summary tables.
    Returns:
        ``{iou_type: {"AP": ..., "AP50": ..., ..., "ARl": ...}}`` with the 12 standard COCOeval stats (-1 where
        COCOeval has nothing to average). With no detections every stat is 0.0.
    """
    _, COCOeval = _coco_api()
    coco_gt = coco_from_dataset(gt) if isinstance(gt, dict) else gt
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad:
        raise ValueError(f"unknown iou type(s) {bad}; choose from {IOU_TYPES}")
    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        dets = [_with_bytes_rle(d) for d in detections]
        if iou_type == "segm":
            missing = sum(1 for d in dets if not isinstance(d.get("segmentation"), dict))
            if missing:
                raise ValueError(f"{missing} of {len(dets)} detections have no 'segmentation' RLE; segm mAP needs one "
                                 "per detection (evaluate bbox only when the model has no mask head)")
            # without 'bbox', loadRes takes the area from the mask (with it, from the box), as detectron2 does
            dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
        else:
            dets = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
        if not dets:
            out[iou_type] = {name: 0.0 for name in STAT_NAMES}
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
            ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            if img_ids is not None:
                ev.params.imgIds = sorted(int(i) for i in img_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if verbose:
            print(f"COCOeval ({iou_type}):\n{buf.getvalue()}")
        out[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    return out
