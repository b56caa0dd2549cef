"""Write a tiny random PaDT model + processor and a small generated training set (released JSONL format).

    python src/make_tiny_sft_data.py --out outputs/padt_tiny    # -> OUT/model, OUT/data/train.jsonl, OUT/data/images

See `padt.testing.sft_data` (what the images and records hold) and `run_scripts/padt_tiny_cpu_sft.sh` (trains on it).
"""

from __future__ import annotations

import argparse

from padt.testing.sft_data import make_tiny_sft_workspace


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--num-images", type=int, default=8, help="records / images to generate")
    parser.add_argument("--num-empty", type=int, default=3, help="how many of them have no object")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model weights and the images")
    args = parser.parse_args(argv)
    paths = make_tiny_sft_workspace(args.out, num_images=args.num_images, num_empty=args.num_empty, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
