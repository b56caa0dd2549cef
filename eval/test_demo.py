"""PaDT on one image: print the completion, boxes and scores; write pictures and predictions.json.

    python eval/test_demo.py --model PaDT-MLLM/PaDT_Pro_3B --image car.jpg --task rec --query "the car on the left"
    python eval/test_demo.py --model DIR --image IMG --prompt "Please describe this image."

Writes to --out (default outputs/demo): completion.txt (prompt and completion, as the authors' demo), pred_box.png
(boxes and labels), mask_seg.png (masks), vrt_seg.png (the VRT cells the model chose, numbered) and predictions.json
(text + objects: label, box in original-image pixels, mask as COCO RLE, score, VRT ids). Runs on CPU; uses the GPU
when there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "padt" / "assets" / "tiny_default"
DEFAULT_IMAGE = DEFAULT_MODEL / "sample.png"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the shipped tiny model)")
    ap.add_argument("--image", default=None, help="image file (default: the shipped sample image)")
    ap.add_argument("--prompt", default=None, help="full prompt text (overrides --task/--query)")
    ap.add_argument("--task", choices=["rec", "ovd", "ric"], default="ric")
    ap.add_argument("--query", default=None, help="rec: the referring sentence; ovd: comma-separated categories")
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args(argv)

    from padt.inference.predictor import cli_generation_error

    error = cli_generation_error(args.max_new_tokens, args.device)
    if error:
        print(error, file=sys.stderr)
        return 2
    model_path = args.model or DEFAULT_MODEL
    if args.model is None and not DEFAULT_MODEL.exists():
        print("No --model given and no shipped default model was found at "
              f"{DEFAULT_MODEL}.\nPass a PaDT checkpoint: --model PaDT-MLLM/PaDT_Pro_3B (or a local directory).",
              file=sys.stderr)
        return 2
    if args.model is not None and not Path(args.model).exists() and Path(args.model).is_absolute():
        print(f"model path {args.model} does not exist", file=sys.stderr)
        return 2
    image_path = Path(args.image) if args.image else DEFAULT_IMAGE
    if image_path.is_dir():
        print(f"--image {image_path} is a directory, not an image file; pass --image PATH/TO/IMAGE", file=sys.stderr)
        return 2
    if not image_path.is_file():
        print(f"image file {image_path} does not exist; pass --image PATH", file=sys.stderr)
        return 2

    from PIL import UnidentifiedImageError

    from padt.geometry.masks import rle_encode
    from padt.inference.demo import build_prompt
    from padt.inference.predictor import PaDTPredictor
    from padt.inference.visualization import draw_boxes, draw_masks, draw_vrt_cells
    from padt.processing import load_image

    try:
        image = load_image(image_path)
    except (UnidentifiedImageError, OSError, ValueError) as err:  # ValueError: odd mode, aspect ratio over 200
        print(f"cannot read image {image_path}: {err}", file=sys.stderr)
        return 2
    try:
        predictor = PaDTPredictor.from_pretrained(model_path, device=args.device, max_new_tokens=args.max_new_tokens)
    except OSError as err:
        print(f"cannot load model {model_path}: {err}", file=sys.stderr)
        return 2
    try:
        prompt = build_prompt(args.task, args.query, args.prompt)
    except ValueError as err:
        print(f"{err} (use --query, or --prompt)", file=sys.stderr)
        return 2
    try:
        [pred] = predictor.predict(image, prompt)
    except ValueError as err:  # e.g. a prompt longer than the model's context
        print(f"cannot run the prompt: {err}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = predictor.model.config
    print(f"Completion: {pred.text}")
    for i, obj in enumerate(pred.objects):
        box = ", ".join(f"{v:.1f}" for v in obj.box_xyxy)
        print(f"  object {i}: label={obj.label!r} box_xyxy=[{box}] score={obj.score:.3f} vrts={obj.vrt_ids}")
    (out / "completion.txt").write_text(f"Prompt: {prompt}\nCompletion: {pred.text}\n")
    draw_boxes(image, pred).save(out / "pred_box.png")
    draw_masks(image, pred).save(out / "mask_seg.png")
    draw_vrt_cells(image, pred, cfg.cell_size_px, cfg.spatial_merge_size).save(out / "vrt_seg.png")
    record = {
        "image": str(image_path), "prompt": prompt, "text": pred.text, "image_size": list(pred.image_size),
        "objects": [{"label": o.label, "box_xyxy": o.box_xyxy, "score": o.score, "vrt_ids": o.vrt_ids,
                     "mask_rle": rle_encode(o.mask) if o.mask is not None else None} for o in pred.objects],
    }
    (out / "predictions.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out}/completion.txt, pred_box.png, mask_seg.png, vrt_seg.png, predictions.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
