"""Synthetic coloured-shape scenes in the released PaDT format (REC/RES, OVD, RIC) plus COCO ground truth.

    # 4000 training scenes and 300 held-out scenes (a separate random stream), 168 x 168 px = 6 x 6 merged cells
    python src/preprocess/make_shapes.py --out data/shapes --num-images 4000 --num-val-images 300 --seed 0

Writes DIR/images/{split}_{i:06d}.png, DIR/refer_{split}.jsonl (REC and RES), DIR/ovd_{split}.jsonl,
DIR/ric_{split}.jsonl, DIR/coco_{split}.json, DIR/ric_{split}_captions.json and DIR/manifest.json.
Same arguments -> byte-identical files, with any --workers. See docs/shapes.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from padt.shapes import BACKGROUNDS, KINDS, PALETTE, PROMPT_ORDERS, ShapesConfig, generate_dataset


def parse_image_size(text: str) -> tuple[int, int]:
    """'168' -> (168, 168); '168x224' -> (height 168, width 224)."""
    m = re.fullmatch(r"(\d+)(?:[xX](\d+))?", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW (pixels), got {text!r}")
    h = int(m[1])
    return h, int(m[2]) if m[2] else h


def build_parser() -> argparse.ArgumentParser:
    d = ShapesConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-images", type=int, required=True, help="training scenes (split 'train'; 0 = none)")
    p.add_argument("--num-val-images", type=int, default=200, help="held-out scenes (split 'val'; default 200)")
    p.add_argument("--num-test-images", type=int, default=0, help="second held-out split 'test' (default 0 = none)")
    p.add_argument("--seed", type=int, default=0, help="scene i of split s uses default_rng([seed, s, i]) (default 0)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already has a manifest.json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    cores = os.cpu_count() or 1
    p.add_argument("--workers", type=int, default=cores,
                   help=f"processes that draw the scenes; the files do not depend on it (default: all cores, "
                        f"{cores} here)")

    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=parse_image_size, default=(d.height, d.width),
                   help=f"N or HxW pixels (default {d.height}x{d.width}); multiples of patch x merge avoid resizing")
    g.add_argument("--patch-size", type=int, default=d.patch_size, help=f"ViT patch size (default {d.patch_size})")
    g.add_argument("--merge-size", type=int, default=d.merge_size, help=f"spatial merge size (default {d.merge_size})")
    g.add_argument("--colours", nargs="+", choices=sorted(PALETTE), default=list(d.colours), metavar="COLOUR",
                   help=f"shape colours from {sorted(PALETTE)} (default: {' '.join(d.colours)})")
    g.add_argument("--kinds", nargs="+", choices=KINDS, default=list(d.kinds), metavar="KIND",
                   help=f"shape kinds = OVD categories, in category-id order (default: {' '.join(d.kinds)})")
    g.add_argument("--backgrounds", nargs="+", choices=sorted(BACKGROUNDS), default=list(d.backgrounds),
                   metavar="NAME", help=f"background colours (default: {' '.join(d.backgrounds)})")
    g.add_argument("--noise", type=int, default=d.noise, help=f"per-pixel +/- noise (default {d.noise})")

    g = p.add_argument_group("scene layout")
    g.add_argument("--min-objects", type=int, default=d.min_objects, help=f"default {d.min_objects}")
    g.add_argument("--max-objects", type=int, default=d.max_objects, help=f"default {d.max_objects}")
    g.add_argument("--max-same", type=int, default=d.max_same,
                   help=f"most objects sharing colour and kind (default {d.max_same})")
    g.add_argument("--size-range", type=float, nargs=2, default=list(d.size_range), metavar=("LOW", "HIGH"),
                   help=f"shape side as a fraction of the shorter image side (default {d.size_range[0]} "
                        f"{d.size_range[1]})")
    g.add_argument("--max-occlusion", type=float, default=d.max_occlusion,
                   help=f"largest hidden fraction of a shape (default {d.max_occlusion})")
    g.add_argument("--min-cells", type=int, default=d.min_cells,
                   help=f"fewest foreground merged cells per object (default {d.min_cells})")
    g.add_argument("--position-margin", type=float, default=d.position_margin,
                   help=f"'on the left' etc.: centres this fraction of the image apart (default {d.position_margin})")
    g.add_argument("--size-ratio", type=float, default=d.size_ratio,
                   help=f"'the larger': area ratio (default {d.size_ratio})")
    g.add_argument("--ovd-prompt-order", choices=PROMPT_ORDERS, default=d.ovd_prompt_order,
                   help="auto: shuffled for train, category-id order for val/test (default auto)")
    return p


def config_from_args(args: argparse.Namespace) -> ShapesConfig:
    return ShapesConfig(
        height=args.image_size[0], width=args.image_size[1], patch_size=args.patch_size, merge_size=args.merge_size,
        colours=tuple(args.colours), kinds=tuple(args.kinds), backgrounds=tuple(args.backgrounds), noise=args.noise,
        min_objects=args.min_objects, max_objects=args.max_objects, max_same=args.max_same,
        size_range=tuple(args.size_range), max_occlusion=args.max_occlusion, min_cells=args.min_cells,
        position_margin=args.position_margin, size_ratio=args.size_ratio, ovd_prompt_order=args.ovd_prompt_order,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if (out / "manifest.json").exists() and not args.overwrite:
        print(f"error: {out} already holds a generated data set (manifest.json); pass --overwrite", file=sys.stderr)
        return 2
    counts = {"train": args.num_images, "val": args.num_val_images, "test": args.num_test_images}
    try:
        config = config_from_args(args)
        manifest = generate_dataset(out, counts, seed=args.seed, config=config, progress=not args.no_progress,
                                    workers=args.workers)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, c in manifest["splits"].items():
        print(f"{split}: {c['images']} images, {c['objects']} objects, {c['refer_records']} REC/RES records "
              f"-> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
