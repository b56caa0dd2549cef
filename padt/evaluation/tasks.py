"""Metrics of each task from the samples and their merged prediction records (index -> record).

Protocols:

- ``standard``: one answer per sample, keyed by the sample (no text matching). REC: Acc@0.5 of the first predicted
  object's box. RES: cIoU (cumulative I / cumulative U) and gIoU (mean IoU) of the first predicted object's mask.
  OVD: COCO bbox + segm mAP (official annotations when given). RIC: caption metrics + grounding.
- ``paper``: the standard metrics plus the authors' numbers (their ``eval/evaluation_scripts/eval_refcoco.py``;
  docs/evaluation.md#metrics-and-protocols), prefixed ``paper_``: predictions are joined to the ground truth on
  ``"{image_id}_{echoed sentence}"`` and each key scores the best IoU over its predicted objects (a paraphrased echo
  misses, a missing key scores 0); REC ``paper_Acc@0.5`` and RES ``paper_cIoU`` (which is a mean IoU, despite the
  name), with the authors' rounded pixel boxes (`authors_box_xywh`).  For a key that occurs in several records the
  last record's ground truth is used (a dict overwrite).

Each function returns ``{"metrics": {name: float}, "info": {...}}``; "info" holds counts and notes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from padt.evaluation.coco_gt import categories_from_samples, detections, gt_from_records, load_official
from padt.evaluation.data import EvalSample, image_wh, referred_object
from padt.evaluation.metrics.boxes import authors_box_xywh, normalized_xyxy_to_pixels, xywh_to_xyxy
from padt.evaluation.metrics.caption import DEFAULT_METRICS, caption_scores, strip_object_refs
from padt.evaluation.metrics.coco import coco_map
from padt.evaluation.metrics.grounding import GroundingCounts
from padt.evaluation.metrics.rec import accuracy_at, best_iou_per_key, top1_box_ious
from padt.evaluation.metrics.res import ciou, giou, mask_intersection_union, mask_iou

PROTOCOLS = ("standard", "paper")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _first_object(pred: dict | None) -> dict | None:
    return pred["objects"][0] if pred and pred.get("objects") else None


def echo_key(image_id, label: str) -> str:
    """The authors' join key: ``"{image_id}_{label}"``."""
    return f"{image_id}_{label}"


def _paper_pairs(samples: Sequence[EvalSample], preds: Mapping[int, dict]):
    """(key, (object, (W, H))) for every predicted object of every sample."""
    for s in samples:
        pred = preds.get(s.index)
        if pred is None:
            continue
        wh = image_wh(s, pred)
        for obj in pred["objects"]:
            yield echo_key(s.image_id, obj["label"]), (obj, wh)


def rec_metrics(samples: Sequence[EvalSample], preds: Mapping[int, dict], protocol: str = "standard",
                threshold: float = 0.5) -> dict:
    """REC Acc@threshold (and mean box IoU) of the first predicted object; plus the paper's best-of-N."""
    _check_protocol(protocol)
    gt_boxes, top1 = [], []
    for s in samples:
        pred = preds.get(s.index)
        w, h = image_wh(s, pred)
        gt_boxes.append(normalized_xyxy_to_pixels(referred_object(s)["bbox"], w, h))
        obj = _first_object(pred)
        top1.append(obj["box_xyxy"] if obj else None)
    ious = top1_box_ious(top1, gt_boxes)
    tag = f"@{threshold:g}"
    metrics = {f"Acc{tag}": accuracy_at(ious, threshold), "mean_IoU": float(ious.mean()) if len(ious) else 0.0}
    info = {"n_samples": len(samples), "n_without_object": sum(p is None for p in top1)}
    if protocol == "paper":
        gt = {echo_key(s.image_id, referred_object(s)["label"]): gt_boxes[i] for i, s in enumerate(samples)}

        def box_iou(pred, gt_box):
            (obj, (w, h)) = pred
            return top1_box_ious([xywh_to_xyxy(authors_box_xywh(obj["box_cxcywh"], w, h))], [gt_box])[0]

        pairs = list(_paper_pairs(samples, preds))
        best = best_iou_per_key(gt, pairs, box_iou)
        metrics[f"paper_Acc{tag}"] = accuracy_at(list(best.values()), threshold)
        info.update(paper_n_keys=len(gt), paper_objects_without_key=sum(k not in gt for k, _ in pairs))
    return {"metrics": metrics, "info": info}


def res_metrics(samples: Sequence[EvalSample], preds: Mapping[int, dict], protocol: str = "standard") -> dict:
    """RES cIoU and gIoU of the first predicted object's mask; plus the paper's "cIoU" (mean of best IoU)."""
    _check_protocol(protocol)
    inters, unions, n_without = [], [], 0
    for s in samples:
        gt = referred_object(s).get("rle")
        if not isinstance(gt, dict):
            raise ValueError(  # noqa: TRY004 (missing data, not a wrong argument type)
                f"sample {s.index} (image {s.record['image']}) has no ground-truth 'rle' mask")
        obj = _first_object(preds.get(s.index))
        mask = obj.get("mask_rle") if obj else None
        n_without += mask is None
        i, u = mask_intersection_union(mask, gt)
        inters.append(i)
        unions.append(u)
    metrics = {"cIoU": ciou(inters, unions), "gIoU": giou(inters, unions)}
    info = {"n_samples": len(samples), "n_without_mask": n_without}
    if protocol == "paper":
        gt = {echo_key(s.image_id, referred_object(s)["label"]): referred_object(s)["rle"] for s in samples}
        pairs = list(_paper_pairs(samples, preds))
        best = best_iou_per_key(gt, pairs, lambda pred, rle: mask_iou(pred[0].get("mask_rle"), rle))
        metrics["paper_cIoU"] = float(np.mean(list(best.values()))) if best else 0.0
        info.update(paper_n_keys=len(gt), paper_objects_without_key=sum(k not in gt for k, _ in pairs),
                    paper_note="paper_cIoU is the authors' 'cIoU': a mean of per-key best IoUs, not cumulative")
    return {"metrics": metrics, "info": info}


def ovd_metrics(samples: Sequence[EvalSample], preds: Mapping[int, dict], protocol: str = "standard",
                annotations: str | None = None, verbose: bool = False) -> dict:
    """COCO bbox and segm mAP (official annotations when given, else the preprocessed ground truth)."""
    _check_protocol(protocol)
    if annotations:
        gt = load_official(annotations)
        name_to_id = {c["name"].lower(): c["id"] for c in gt.loadCats(gt.getCatIds())}
        img_ids = [s.image_id for s in samples]
        unknown_ids = [i for i in img_ids if i not in gt.imgs]
        if unknown_ids:
            raise ValueError(f"{len(unknown_ids)} evaluated image id(s) are not in {annotations}, e.g. "
                             f"{unknown_ids[:3]}")
        source = f"official annotations ({annotations})"
    else:
        cats = categories_from_samples(samples)
        gt = gt_from_records(samples, preds, cats)
        name_to_id = {c["name"]: c["id"] for c in cats}
        img_ids = None
        source = "preprocessed records (the authors' ground truth)"
    dets = detections(samples, preds, name_to_id)
    iou_types = ["bbox"]
    notes = []
    if dets.without_mask:
        notes.append(f"segm mAP skipped: {dets.without_mask} predicted object(s) have no mask")
    else:
        iou_types.append("segm")
    stats = coco_map(gt, dets.results, iou_types, img_ids=img_ids, verbose=verbose)
    metrics = {f"{t}_{k}": v for t, s in stats.items() for k, v in s.items()}
    info = {"n_samples": len(samples), "ground_truth": source, "n_detections": len(dets.results),
            "unknown_labels": dets.unknown_labels}
    if dets.unknown_labels:
        notes.append(f"{sum(dets.unknown_labels.values())} predicted object(s) with a label that is no category "
                     "were left out of the detections (see unknown_labels)")
    if notes:
        info["notes"] = notes
    return {"metrics": metrics, "info": info}


def ric_metrics(samples: Sequence[EvalSample], preds: Mapping[int, dict], protocol: str = "standard",
                caption_metrics: Sequence[str] = DEFAULT_METRICS, tokenizer: str = "auto",
                threshold: float = 0.5) -> dict:
    """Caption metrics against every caption of the image, and grounding of the predicted objects' boxes."""
    _check_protocol(protocol)
    references, candidates = {}, {}
    counts = GroundingCounts()
    for s in samples:
        pred = preds.get(s.index)
        references[s.index] = [strip_object_refs(r.get("answer_template", "")) for r in s.records]
        candidates[s.index] = strip_object_refs(pred["text"]) if pred else ""
        w, h = image_wh(s, pred)
        gt_boxes = {}
        for rec in s.records:
            for obj in rec.get("objects") or []:
                box = normalized_xyxy_to_pixels(obj["bbox"], w, h)
                gt_boxes.setdefault(tuple(round(v, 3) for v in box), box)
        pred_boxes = [o["box_xyxy"] for o in pred["objects"]] if pred else []
        counts.add(pred_boxes, list(gt_boxes.values()), threshold)
    caps = caption_scores(references, candidates, caption_metrics, tokenizer)
    metrics = dict(caps.scores)
    tag = f"@{threshold:g}"
    metrics[f"grounding_precision{tag}"] = counts.precision
    metrics[f"grounding_recall{tag}"] = counts.recall
    info = {"n_samples": len(samples), "n_captions": sum(len(r) for r in references.values()),
            "caption_tokenizer": caps.tokenizer, "n_predicted_objects": counts.predicted,
            "n_annotated_objects": counts.annotated, "n_matched_objects": counts.matched}
    if caps.skipped:
        info["skipped"] = caps.skipped
    return {"metrics": metrics, "info": info}


def task_metrics(task: str, samples: Sequence[EvalSample], preds: Mapping[int, dict], protocol: str = "standard",
                 **options) -> dict:
    """Dispatch to the task's metrics; `options` go to it (annotations, verbose, caption_metrics, tokenizer)."""
    fns = {"rec": rec_metrics, "res": res_metrics, "ovd": ovd_metrics, "ric": ric_metrics}
    if task not in fns:
        raise ValueError(f"task must be one of {tuple(fns)}, got {task!r}")
    allowed = {"ovd": {"annotations", "verbose"}, "ric": {"caption_metrics", "tokenizer"}}.get(task, set())
    return fns[task](samples, preds, protocol, **{k: v for k, v in options.items() if k in allowed and v is not None})
