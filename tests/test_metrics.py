"""Metrics against hand-computed values on small fixtures (padt.evaluation.metrics)."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest

from padt.evaluation.metrics import caption
from padt.evaluation.metrics.boxes import authors_box_xywh, box_iou_xyxy, normalized_xyxy_to_pixels
from padt.evaluation.metrics.caption import caption_scores, simple_ptb_tokenize, strip_object_refs
from padt.evaluation.metrics.coco import STAT_NAMES, coco_map
from padt.evaluation.metrics.grounding import GroundingCounts, greedy_match
from padt.evaluation.metrics.rec import accuracy_at, best_iou_per_key, top1_box_ious
from padt.evaluation.metrics.res import ciou, giou, mask_intersection_union, mask_iou
from padt.geometry.masks import rle_encode


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


# --------------------------------------------------------------------------- boxes / REC
def test_box_iou_known_values():
    iou = box_iou_xyxy([[0, 0, 10, 10], [0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0])
    # shifted by (2, 3) on a 10x10 box: intersection 8*7 = 56, union 200 - 56 = 144
    assert box_iou_xyxy([[0, 0, 10, 10]], [[2, 3, 12, 13]])[0, 0] == pytest.approx(56 / 144)
    assert box_iou_xyxy([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 0.0  # empty union


def test_authors_box_convention():
    # x = max(cx - w/2, 0); w clipped at 1; x + w not clipped; values x size, rounded
    assert authors_box_xywh([0.5, 0.5, 0.2, 0.4], 100, 50) == [40, 15, 20, 20]
    assert authors_box_xywh([0.05, 0.9, 0.2, 0.4], 100, 50) == [0, 35, 20, 20]  # x clipped at 0, y + h > H kept
    assert authors_box_xywh([0.5, 0.5, 1.5, 0.2], 10, 10) == [0, 4, 10, 2]  # w clipped at 1
    assert authors_box_xywh([0.25, 0.5, 0.1, 0.1], 10, 10) == [2, 4, 1, 1]  # 2.0 exactly, round(0.5*... ) half-even
    with pytest.raises(ValueError, match="4 values"):
        authors_box_xywh([0.5, 0.5, 0.1], 10, 10)
    assert normalized_xyxy_to_pixels([0.1, 0.2, 0.5, 1.0], 200, 100) == pytest.approx([20, 20, 100, 100])


def test_rec_accuracy_perfect_shifted_and_missing():
    gt = [[0, 0, 10, 10], [10, 10, 30, 30], [0, 0, 4, 4]]
    assert accuracy_at(top1_box_ious(gt, gt)) == 1.0
    shifted = [[2, 3, 12, 13], [10, 10, 30, 30], None]  # IoU 56/144 < 0.5, 1.0, missing -> 0
    ious = top1_box_ious(shifted, gt)
    np.testing.assert_allclose(ious, [56 / 144, 1.0, 0.0])
    assert accuracy_at(ious, 0.5) == pytest.approx(1 / 3)
    assert accuracy_at(ious, 0.3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="threshold"):
        accuracy_at(ious, 0.0)
    with pytest.raises(ValueError, match="3 ground-truth"):
        top1_box_ious(shifted[:2], gt)


def test_best_of_n_by_key():
    gt = {"1_a": [0, 0, 10, 10], "2_b": [0, 0, 10, 10], "3_c": [0, 0, 10, 10]}
    preds = [("1_a", [20, 20, 30, 30]), ("1_a", [0, 0, 10, 10]),  # best of two: 1.0
             ("2_b", [5, 0, 15, 10]),  # 1/3
             ("9_z", [0, 0, 10, 10])]  # paraphrased echo: no such key, ignored
    best = best_iou_per_key(gt, preds, lambda p, g: box_iou_xyxy([p], [g])[0, 0])
    assert best == pytest.approx({"1_a": 1.0, "2_b": 1 / 3, "3_c": 0.0})


# --------------------------------------------------------------------------- RES
def test_mask_intersection_union_and_iou():
    gt = rle_encode(_rect(10, 10, 0, 10, 0, 5))  # 50 px
    pred = rle_encode(_rect(10, 10, 0, 10, 2, 7))  # 50 px, overlap 30
    assert mask_intersection_union(pred, gt) == (30, 70)
    assert mask_iou(pred, gt) == pytest.approx(30 / 70)
    assert mask_intersection_union(None, gt) == (0, 50)
    assert mask_iou(gt, gt) == 1.0
    empty = rle_encode(np.zeros((10, 10), np.uint8))
    assert mask_iou(empty, empty) == 1.0
    with pytest.raises(ValueError, match="original image size"):
        mask_intersection_union(rle_encode(np.ones((5, 10), np.uint8)), gt)


def test_ciou_differs_from_mean_iou():
    # a large object found exactly, a small one missed: cumulative IoU is dominated by the large one
    big = _rect(20, 20, 0, 10, 0, 10)  # 100 px
    small_gt, small_pred = _rect(20, 20, 15, 17, 15, 20), _rect(20, 20, 0, 2, 15, 20)  # 10 px each, disjoint
    pairs = [mask_intersection_union(rle_encode(big), rle_encode(big)),
             mask_intersection_union(rle_encode(small_pred), rle_encode(small_gt))]
    inters, unions = zip(*pairs)
    assert (inters, unions) == ((100, 0), (100, 20))
    assert ciou(inters, unions) == pytest.approx(100 / 120)
    assert giou(inters, unions) == pytest.approx(0.5)
    assert ciou([5, 5], [10, 10]) == giou([5, 5], [10, 10]) == 0.5  # equal-size objects: the two agree
    assert ciou([], []) == 0.0 and giou([], []) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        ciou([1], [1, 2])


# --------------------------------------------------------------------------- COCO
def _coco_fixture():
    h, w = 40, 60
    masks = {1: _rect(h, w, 5, 25, 5, 25), 2: _rect(h, w, 10, 30, 30, 55), 3: _rect(h, w, 0, 20, 0, 30)}
    anns = []
    for ann_id, (img, cat, m) in enumerate([(1, 1, masks[1]), (1, 2, masks[2]), (2, 1, masks[3])], start=1):
        ys, xs = np.nonzero(m)
        box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        anns.append({"id": ann_id, "image_id": img, "category_id": cat, "bbox": box, "area": float(m.sum()),
                     "iscrowd": 0, "segmentation": rle_encode(m)})
    gt = {"images": [{"id": 1, "width": w, "height": h}, {"id": 2, "width": w, "height": h}],
          "annotations": anns, "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    return gt, masks


def _dets_from(gt, shift=0, scores=(0.9, 0.8, 0.7)):
    out = []
    for ann, s in zip(gt["annotations"], scores):
        x, y, bw, bh = ann["bbox"]
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": [x + shift, y, bw, bh],
                    "score": s, "segmentation": ann["segmentation"]})
    return out


def test_coco_map_perfect_is_one():
    gt, _ = _coco_fixture()
    stats = coco_map(gt, _dets_from(gt))
    assert set(stats) == {"bbox", "segm"} and list(stats["bbox"]) == list(STAT_NAMES)
    assert stats["bbox"]["AP"] == pytest.approx(1.0) and stats["segm"]["AP"] == pytest.approx(1.0)
    assert coco_map(gt, [], ["bbox"])["bbox"]["AP"] == 0.0


def test_coco_map_matches_pycocotools_directly():
    from pycocotools import mask as mask_api
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, _ = _coco_fixture()
    dets = _dets_from(gt, shift=4) + [{"image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.95,
                                       "segmentation": rle_encode(_rect(40, 60, 0, 10, 0, 10))}]
    ours = coco_map(gt, dets)
    assert 0 < ours["bbox"]["AP"] < 1
    # the same data straight through pycocotools (bytes RLEs; segm results without 'bbox' so areas are mask areas)
    ref_gt = copy.deepcopy(gt)
    for a in ref_gt["annotations"]:
        a["segmentation"] = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ref_gt
        coco.createIndex()
        for iou_type in ("bbox", "segm"):
            res = []
            for d in copy.deepcopy(dets):
                d["segmentation"]["counts"] = d["segmentation"]["counts"].encode()
                if iou_type == "bbox":
                    del d["segmentation"]
                else:
                    del d["bbox"]
                    assert mask_api.area(d["segmentation"]) > 0
                res.append(d)
            ev = COCOeval(coco, coco.loadRes(res), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            np.testing.assert_allclose([ours[iou_type][k] for k in STAT_NAMES], ev.stats)


def test_coco_map_errors():
    gt, _ = _coco_fixture()
    with pytest.raises(ValueError, match="no 'segmentation'"):
        coco_map(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}], ["segm"])
    with pytest.raises(ValueError, match="unknown iou type"):
        coco_map(gt, [], ["keypoints"])
    with pytest.raises(ValueError, match="'categories'"):
        coco_map({"images": [], "annotations": []}, [])


# --------------------------------------------------------------------------- captions
CAPTIONS = {
    1: ["A man rides a motorcycle on a dirt path."],
    2: ["Two dogs play with a red ball in the park."],
    3: ["A plate of food with broccoli and rice sits on a wooden table."],
}


def test_strip_object_refs_and_python_tokenizer():
    assert strip_object_refs("A man (<|Obj_0|>) rides a bike (<|Obj_1|>, <|Obj_2|>) .") == "A man rides a bike."
    assert strip_object_refs("A cat (<|VRT_3|><|VRT_9|>) sleeps.<|im_end|>") == "A cat sleeps."
    assert strip_object_refs("Two birds (<|Obj_0|>,<|Obj_1|>) and a tree (left).") == "Two birds and a tree (left)."
    assert simple_ptb_tokenize("A man's dog doesn't run, \"fast\"!") == "a man 's dog does n't run fast"


@pytest.mark.parametrize("tokenizer", ["python", "auto"])
def test_identical_captions_give_reference_values(tokenizer):
    cands = {k: v[0] for k, v in CAPTIONS.items()}
    result = caption_scores(CAPTIONS, cands, ["BLEU", "ROUGE_L", "CIDEr"], tokenizer=tokenizer)
    assert result.scores["CIDEr"] == pytest.approx(10.0)  # CIDEr-D's x10 scale, cosine 1, no length penalty
    assert result.scores["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert result.scores["ROUGE_L"] == pytest.approx(1.0)
    assert result.tokenizer == ("ptb-java" if tokenizer == "auto" and caption.java_available() else "python")
    assert not result.skipped


def test_caption_scores_known_rouge_and_partial_match():
    refs = {1: ["a cat sat on the mat"], 2: ["dogs run"]}
    result = caption_scores(refs, {1: "a cat sat", 2: "dogs run"}, ["ROUGE_L", "CIDEr"], tokenizer="python")
    # image 1: LCS 3, P = 1, R = 0.5, F_beta(1.2) = (1 + 1.44) * 0.5 / (0.5 + 1.44); image 2: 1.0
    assert result.scores["ROUGE_L"] == pytest.approx((2.44 * 0.5 / 1.94 + 1.0) / 2)
    assert 0 < result.scores["CIDEr"] < 10


def test_java_metrics_are_skipped_with_a_message_without_java(monkeypatch):
    monkeypatch.setattr(caption, "java_available", lambda: False)
    cands = {k: v[0] for k, v in CAPTIONS.items()}
    result = caption_scores(CAPTIONS, cands, ["BLEU", "METEOR", "SPICE", "CIDEr"])
    assert result.tokenizer == "python"
    assert set(result.skipped) == {"METEOR", "SPICE"} and "Java" in result.skipped["METEOR"]
    assert "METEOR" not in result.scores and result.scores["CIDEr"] == pytest.approx(10.0)
    with pytest.raises(RuntimeError, match="needs Java"):
        caption_scores(CAPTIONS, cands, ["BLEU"], tokenizer="ptb")


def test_caption_scores_input_errors():
    with pytest.raises(ValueError, match="same keys"):
        caption_scores(CAPTIONS, {1: "x"}, ["BLEU"], tokenizer="python")
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_scores(CAPTIONS, {k: "x" for k in CAPTIONS}, ["BLEURT"])
    with pytest.raises(ValueError, match="no reference"):
        caption_scores({1: []}, {1: "x"}, ["BLEU"], tokenizer="python")


# --------------------------------------------------------------------------- grounding
def test_greedy_match_is_one_to_one():
    iou = np.array([[0.9, 0.6], [0.8, 0.1], [0.2, 0.4]])
    # 0.9: pred 0 takes gt 0; 0.8 (pred 1, gt 0) and 0.6 (pred 0, gt 1) are blocked; 0.4: pred 2 takes gt 1
    assert greedy_match(iou, 0.5) == [(0, 0)]
    assert greedy_match(iou, 0.3) == [(0, 0), (2, 1)]
    assert greedy_match(iou, 0.05) == [(0, 0), (2, 1)]
    assert greedy_match(np.zeros((0, 3))) == []


def test_grounding_counts():
    counts = GroundingCounts()
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert counts.add([[0, 0, 10, 10], [0, 0, 10, 10], [21, 20, 31, 30]], gt) == 2  # duplicate pred matches once
    assert counts.add([], [[0, 0, 5, 5]]) == 0
    assert (counts.matched, counts.predicted, counts.annotated) == (2, 3, 3)
    assert counts.precision == pytest.approx(2 / 3) and counts.recall == pytest.approx(2 / 3)
    assert GroundingCounts().precision == 0.0
