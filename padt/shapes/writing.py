"""Writing the shapes benchmark: images, the records and COCO files of each split, and ``manifest.json``.

Scene ``i`` of split ``s`` uses the generator ``numpy.random.default_rng([seed, SPLIT_STREAMS[s], i])``, so splits
never share a stream and a scene does not depend on how many images are generated; the same arguments give
byte-identical files whatever the number of worker processes.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from padt.io import write_json, write_jsonl
from padt.shapes.options import ShapesConfig
from padt.shapes.records import caption, coco_categories, coco_entries, ovd_record, referring_records, ric_record
from padt.shapes.scenes import Scene, render_scene, sample_scene

SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``: independent streams per (seed, split, index)."""
    if split not in SPLIT_STREAMS:
        raise ValueError(f"split must be one of {tuple(SPLIT_STREAMS)}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    return np.random.default_rng([seed, SPLIT_STREAMS[split], index])


def split_files(split: str) -> dict[str, str]:
    """File names (relative to the output folder) of one split."""
    return {"refer": f"refer_{split}.jsonl", "ovd": f"ovd_{split}.jsonl", "ric": f"ric_{split}.jsonl",
            "coco": f"coco_{split}.json", "captions": f"ric_{split}_captions.json"}


def _image_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.png"


def _draw_scene(images_dir: Path, split: str, seed: int, config: ShapesConfig, index: int) -> Scene:
    """Sample scene ``index`` of ``split``, write its image into ``images_dir`` and return it (the per-scene work of
    :func:`generate_split`, run in worker processes when it has several)."""
    scene = sample_scene(scene_rng(seed, split, index), config)
    render_scene(scene, config.noise).save(images_dir / _image_name(split, index), format="PNG", compress_level=1)
    return scene


def _drawn_scenes(images_dir: Path, split: str, num_images: int, seed: int, config: ShapesConfig,
                  workers: int) -> Iterator[Scene]:
    """Scenes ``0 .. num_images - 1`` of ``split`` in order, drawn by ``workers`` processes (each scene has its own
    generator, so the result does not depend on the count). Spawned, not forked: the caller may hold torch's threads."""
    draw = partial(_draw_scene, images_dir, split, seed, config)
    if workers == 1 or num_images < 2:
        yield from map(draw, range(num_images))
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, num_images)) as pool:
        yield from pool.imap(draw, range(num_images), chunksize=max(1, min(64, num_images // (4 * workers))))


def generate_split(out_dir: str | os.PathLike, split: str, num_images: int, seed: int, config: ShapesConfig,
                   progress: bool = False, workers: int = 1) -> dict:
    """Write ``num_images`` scenes of ``split``: ``images/{split}_{i:06d}.png`` (image id i + 1) and the files of
    :func:`split_files`, sampling and drawing the scenes in ``workers`` processes. Returns the split's counts. Same
    arguments (any ``workers``) -> byte-identical files."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    refer, ovd, ric, images, anns, captions = [], [], [], [], [], []
    scenes = _drawn_scenes(out / "images", split, num_images, seed, config, workers)
    for i, scene in enumerate(tqdm(scenes, total=num_images, desc=f"shapes {split}", unit="img",
                                   disable=not progress)):
        image_id, file_name = i + 1, _image_name(split, i)
        refer.extend(referring_records(image_id, file_name, scene, config))
        ovd.append(ovd_record(image_id, file_name, scene, split, config))
        ric.append(ric_record(image_id, file_name, scene, config))
        image, image_anns = coco_entries(image_id, file_name, scene, len(anns) + 1, config)
        images.append(image)
        anns.extend(image_anns)
        captions.append({"id": image_id, "image_id": image_id, "caption": caption(scene, with_refs=False)})
    files = split_files(split)
    write_jsonl(refer, out / files["refer"])
    write_jsonl(ovd, out / files["ovd"])
    write_jsonl(ric, out / files["ric"])
    info = {"description": f"padt shapes, split {split}, seed {seed}"}
    write_json({"info": info, "images": images, "annotations": anns, "categories": coco_categories(config)},
               out / files["coco"])
    write_json({"info": info, "images": [{k: im[k] for k in ("id", "file_name", "height", "width")} for im in images],
                "annotations": captions}, out / files["captions"])
    return {"images": num_images, "objects": len(anns), "refer_records": len(refer), "ovd_records": len(ovd),
            "ric_records": len(ric)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generate_dataset(out_dir: str | os.PathLike, counts: Mapping[str, int], seed: int = 0,
                     config: ShapesConfig | None = None, progress: bool = False, workers: int = 1) -> dict:
    """Write every split of ``counts`` ({split: num_images}; splits with 0 images are left out) and
    ``manifest.json`` (seed, options, counts, processor pixel limits, SHA-256 of every written file), drawing scenes
    in ``workers`` processes (the files do not depend on it). Returns the manifest."""
    config = config or ShapesConfig()
    unknown = [s for s in counts if s not in SPLIT_STREAMS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected names from {tuple(SPLIT_STREAMS)}")
    if any(n < 0 for n in counts.values()) or not any(counts.values()):
        raise ValueError(f"image counts must be >= 0 with at least one positive, got {dict(counts)}")
    out = Path(out_dir)
    splits, hashes = {}, {}
    for split, n in counts.items():
        if n == 0:
            continue
        splits[split] = generate_split(out, split, n, seed, config, progress, workers)
        names = list(split_files(split).values()) + [f"images/{_image_name(split, i)}" for i in range(n)]
        hashes.update({name: _sha256(out / name) for name in names})
    pixels = config.grid[0] * config.grid[1] * config.cell_size**2
    manifest = {
        "generator": "padt.shapes", "seed": seed, "splits": splits,
        "streams": {s: f"numpy.random.default_rng([{seed}, {SPLIT_STREAMS[s]}, image_index])" for s in splits},
        "options": config.to_dict(), "grid": list(config.grid),
        "processor": {"patch_size": config.patch_size, "merge_size": config.merge_size, "min_pixels": pixels,
                      "max_pixels": pixels},
        "categories": coco_categories(config), "files": dict(sorted(hashes.items())),
    }
    write_json(manifest, out / "manifest.json")
    return manifest
