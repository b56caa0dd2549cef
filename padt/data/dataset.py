"""`PaDTDataset`: records of one or more sources -> training items with images and re-derived foreground cells.

An item (``dataset[i]``) is a dict:

- ``image``: PIL RGB (tiny images upscaled so the short side is one cell, LANCZOS, as the authors' `compute_loss` in
  `src/PaDT/trainer/padt_sft_trainer.py` does; docs/method.md#the-training-step-and-losses);
- ``prompt``: the first conversation value with ``"<image>"`` removed (as the authors' `src/PaDT/sft_train.py`
  does; docs/training.md); ``answer_template``; ``task``;
- ``objects``: one dict per record object, in record order: ``cells`` (local merged-cell indices at the processor's
  grid, `padt.data.cells.derive_cells`), ``box`` (normalised [x1, y1, x2, y2]), ``rle`` (COCO RLE or None),
  ``label`` (str), ``fallback`` (True when no cell passed the foreground rule and the box-centre cell is used);
- ``index`` (position in this dataset, seeds the VRT sampling), ``grid`` ((grid_h, grid_w) merged cells),
  ``source`` (the source's label) and ``where`` (``file:line`` of the record, for error messages).

Index space: the sources one after another, each repeated ``source.repeat`` times.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from padt.data.cells import derive_cells, upscale_tiny_image
from padt.data.records import DataSource, HubRecords, JsonlRecords, load_sources, open_records
from padt.geometry.grids import GridGeometry
from padt.geometry.masks import FOREGROUND_RULES, ForegroundRule
from padt.processing.qwen import load_image

logger = logging.getLogger(__name__)


class PaDTDataset(torch.utils.data.Dataset):
    """Training items from PaDT JSONL sources.

    Args:
        sources: a list of `DataSource`, a YAML mixture path, or a ":"-separated path string (see
            `padt.data.records.load_sources`; ``image_folders`` goes with the ":" form).
        geometry: the processor's `GridGeometry`, or a processor / image processor to read it from. Cells are
            derived at the grid this geometry gives for each image, so it must be the collator's processor.
        image_folders: ":"-separated image folders for the ":" form of ``sources``.
        foreground_rules: rule per record ``task`` (default `padt.geometry.masks.FOREGROUND_RULES`); an unknown task
            raises.
        upscale_tiny: upscale images with a side under one cell (the authors do).
        check_images: check at construction that every image file exists (default: checked when read).
    """

    def __init__(
        self,
        sources: Sequence[DataSource] | str | os.PathLike,
        geometry: GridGeometry | Any,
        *,
        image_folders: str | None = None,
        foreground_rules: Mapping[str, ForegroundRule] | None = None,
        upscale_tiny: bool = True,
        check_images: bool = False,
    ):
        self.sources = load_sources(sources, image_folders)
        if not self.sources:
            raise ValueError("no data sources given")
        self.geometry = geometry if isinstance(geometry, GridGeometry) else GridGeometry.from_processor(geometry)
        self.foreground_rules = dict(FOREGROUND_RULES if foreground_rules is None else foreground_rules)
        self.upscale_tiny = bool(upscale_tiny)
        self.stores: list[JsonlRecords | HubRecords] = [open_records(s.path) for s in self.sources]
        self._ends: list[int] = []
        total = 0
        for source, store in zip(self.sources, self.stores):
            total += len(store) * source.repeat
            self._ends.append(total)
        self.fallback_counts: Counter[str] = Counter()  # per source label, in this process
        self.object_counts: Counter[str] = Counter()
        if check_images:
            self.check_images()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.label} x{s.repeat} ({len(st)})" for s, st in zip(self.sources, self.stores))
        return f"PaDTDataset({len(self)} items: {parts}; {self.geometry})"

    # ------------------------------------------------------------------ lookup
    def locate(self, index: int) -> tuple[int, int]:
        """Dataset index -> (source number, record number in that source)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        s = bisect.bisect_right(self._ends, index)
        start = self._ends[s - 1] if s else 0
        return s, (index - start) % len(self.stores[s])

    def image_path(self, source: DataSource, name: str) -> str:
        return os.path.join(source.image_folder, name) if source.image_folder else name

    def check_images(self) -> None:
        """Raise FileNotFoundError listing (up to 5 of) the image files that do not exist."""
        missing = []
        for source, store in zip(self.sources, self.stores):
            missing += [p for p in (self.image_path(source, n) for n in store.image_names()) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image file(s) not found, e.g. {missing[:5]}")

    def fallback_report(self) -> dict[str, dict[str, int]]:
        """Per source: objects read and objects that used the box-centre fallback cell (this process only)."""
        return {s.label: {"objects": self.object_counts[s.label], "fallback": self.fallback_counts[s.label]}
                for s in self.sources}

    # ------------------------------------------------------------------ items
    def __getitem__(self, index: int) -> dict:
        index = int(index)
        s, r = self.locate(index)
        source, store = self.sources[s], self.stores[s]
        record, where = store[r], store.where(r)
        task = record["task"]
        rule = self.foreground_rules.get(task)
        if rule is None:
            raise ValueError(f"{where}: unknown task {task!r}; known tasks: {sorted(self.foreground_rules)} "
                             "(pass foreground_rules for custom tasks)")
        name = record["image"][0] if isinstance(record["image"], (list, tuple)) else record["image"]
        path = self.image_path(source, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path} (record {where})")
        try:
            image = load_image(path)  # upright (EXIF orientation applied), RGB from any PIL mode
        except ValueError as err:  # an unconvertible mode or an aspect ratio the processor cannot take
            raise ValueError(f"{err} (record {where})") from None
        width, height = image.size  # original size (upright frame): the RLE and the normalised boxes refer to it
        if self.upscale_tiny:
            image = upscale_tiny_image(image, self.geometry.cell_size)
        grid = self.geometry.grid(image.height, image.width)
        objects = []
        for k, obj in enumerate(record["objects"]):
            try:
                cells, fallback = derive_cells(obj, height, width, grid, cell_size=self.geometry.cell_size, rule=rule)
            except ValueError as err:
                raise ValueError(f"{where}: objects[{k}]: {err}") from None
            self.object_counts[source.label] += 1
            if fallback:
                self._note_fallback(source.label, where, k, grid)
            objects.append({"cells": cells, "box": [float(v) for v in obj["bbox"]], "rle": obj.get("rle"),
                            "label": obj.get("label") or "", "fallback": fallback})
        return {
            "image": image,
            "prompt": record["conversations"][0]["value"].replace("<image>", ""),
            "answer_template": record["answer_template"],
            "objects": objects,
            "task": task,
            "index": index,
            "grid": grid,
            "source": source.label,
            "where": where,
        }

    def _note_fallback(self, label: str, where: str, k: int, grid: tuple[int, int]) -> None:
        self.fallback_counts[label] += 1
        n = self.fallback_counts[label]
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th, ... occurrence per source: visible, never a flood
            logger.warning(
                "%s: object %d of %s has no foreground cell on the %dx%d merged grid; using the cell at its box "
                "centre (%d such object(s) of %d read from %s in this process)",
                label, k, where, grid[0], grid[1], n, self.object_counts[label], label,
            )
