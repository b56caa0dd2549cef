"""The defaults that the authors' recipe scripts (run_scripts/padt_{ovd,rec,ric,pro}_{3b,7b}_sft.sh) take from
their configs, as padt.train flags: the data mixture (configs/data/TASK.yaml) as ':'-separated files and image
folders, with the COCO folders under the chosen COCO root, and the training config's DeepSpeed file as a path from the
repository root (so that the scripts work from any directory).

    python src/sft_recipe.py configs/train/sft_3b.yaml configs/data/pro.yaml /data/coco
    # three lines: the data files, their image folders, the DeepSpeed config ('' when the config names none)

A mixture entry with `repeat: N` is listed N times (padt.train oversamples a file that repeats).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COCO_ROOT = "data/coco"  # how configs/data/*.yaml write the COCO image folders


def under_coco_root(folder: str, coco_root: str) -> str:
    """`data/coco/train2017` -> `COCO_ROOT/train2017`; a folder elsewhere is returned unchanged."""
    if folder == DEFAULT_COCO_ROOT or folder.startswith(DEFAULT_COCO_ROOT + "/"):
        return coco_root.rstrip("/") + folder[len(DEFAULT_COCO_ROOT):]
    return folder


def mixture_lists(data_yaml: str | os.PathLike, coco_root: str = DEFAULT_COCO_ROOT) -> tuple[str, str]:
    """A data mixture YAML -> (data_file_paths, image_folders), each ':'-separated, one entry per copy of a file.

    Reads only what the recipes' mixtures use (`path`, `image_folder`, `repeat`), without importing padt (fast, for
    --dry_run); padt.train checks the records, and `padt.data.load_sources_yaml` reads every mixture form.
    """
    import yaml

    with open(data_yaml, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    entries = doc.get("datasets") if isinstance(doc, dict) else doc
    files, folders = [], []
    for i, entry in enumerate(entries or []):
        if not isinstance(entry, dict) or not entry.get("path") or not entry.get("image_folder"):
            raise ValueError(f"{data_yaml}: entry {i} needs a 'path' and an 'image_folder', got {entry!r:.80}")
        repeat = entry.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"{data_yaml}: entry {i} has repeat {repeat!r}; expected a whole number >= 1")
        files += [str(entry["path"])] * repeat
        folders += [under_coco_root(str(entry["image_folder"]), coco_root)] * repeat
    if not files:
        raise ValueError(f"{data_yaml}: expected a list of {{path, image_folder, repeat}} entries under 'datasets'")
    return ":".join(files), ":".join(folders)


def deepspeed_path(train_yaml: str | os.PathLike) -> str:
    """The training config's `deepspeed` entry, a relative one taken from the repository root ('' when absent)."""
    import yaml

    with open(train_yaml, encoding="utf-8") as f:
        value = (yaml.safe_load(f) or {}).get("deepspeed")
    if not value:
        return ""
    return str(value) if os.path.isabs(value) else str(ROOT / value)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train_yaml", help="padt.train --config file (configs/train/sft_*.yaml)")
    ap.add_argument("data_yaml", help="data mixture (configs/data/*.yaml)")
    ap.add_argument("coco_root", nargs="?", default=DEFAULT_COCO_ROOT,
                    help=f"folder that replaces the mixture's leading {DEFAULT_COCO_ROOT} (default: itself)")
    args = ap.parse_args(argv)
    files, folders = mixture_lists(args.data_yaml, args.coco_root)
    print(files, folders, deepspeed_path(args.train_yaml), sep="\n")


if __name__ == "__main__":
    main()
