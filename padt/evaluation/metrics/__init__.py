"""Evaluation metrics, as pure functions of boxes, masks and captions (no model, no file layout).

- `boxes`: IoU of boxes and the authors' COCO box convention (docs/evaluation.md#metrics-and-protocols), implemented
  once.
- `rec`: REC Acc@IoU (top-1 per sample, and the authors' best-of-N over echo keys).
- `res`: RES cIoU (cumulative intersection / cumulative union), gIoU (mean IoU), the authors' "cIoU" (mean of best
  IoU).
- `coco`: COCO bbox / segm mAP through pycocotools.
- `caption`: BLEU, ROUGE-L, CIDEr-D (+ METEOR / SPICE when Java is there) through pycocoevalcap.
- `grounding`: one-to-one box matching of a caption's referenced objects against the annotated ones.
"""
