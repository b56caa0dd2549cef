"""Vision pretraining for a PaDT model trained from scratch: teach the vision tower what is in each merged cell.

Real PaDT starts from Qwen2.5-VL, whose vision tower is pretrained. The tiny shapes model starts from random weights,
and trained end to end it learns colours and positions but not shape kinds: a linear probe on the merged cell
features of the 13 000-step model tells a cell's kind in 52 % of cases (the most frequent kind alone gives 41 %), and
its OVD labels are right for 36 % of its correctly placed boxes, chance for three kinds (docs/results.md). This module
is the tiny model's stand-in for the pretrained tower: before PaDT training, the tower plus three linear heads learn,
for each merged cell of the training images, its class (background or the category of the object covering most of
it), its pooled pixels and its position (`VisionCellPretrainer` says why all three). The merged features are then
scaled back to their size before training (see `pretrain_vision`).

The labels come from the training records' own object masks (`rle`) and `label`s (an OVD file: one record per image,
all objects); no held-out data is used. Training runs through the HF `Trainer` (so it logs, checkpoints and resumes
like `padt.train.run`); afterwards the tower's weights are written back into the full PaDT model, which is saved with its
processor as the starting point of `padt.train.run`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from padt.geometry.masks import cell_coverage, rle_decode
from padt.io import iter_jsonl
from padt.processing.qwen import load_image

__all__ = [
    "CellClassDataset",
    "VisionCellPretrainer",
    "cell_class_labels",
    "cell_feature_rms",
    "cell_pixel_targets",
    "cell_positions",
    "collate_cells",
    "load_cell_records",
    "load_coco_cell_records",
    "pretrain_vision",
    "rescale_cell_features",
]

logger = logging.getLogger(__name__)

BACKGROUND = 0  # class 0 of every cell label; category k of `class_names` is class k + 1


def cell_class_labels(
    objects: Sequence[dict],
    class_names: Sequence[str],
    grid_hw: tuple[int, int],
    cell_size: int,
    min_coverage: float = 0.3,
) -> np.ndarray:
    """Class of every merged cell: the object covering most of it, if it covers at least `min_coverage`.

    Args:
        objects: records' objects, each with `rle` (a COCO RLE at the image size) and `label` (a name in `class_names`).
        class_names: the categories; cell class k + 1 means `class_names[k]`, 0 means background.
        grid_hw: merged grid (grid_h, grid_w) the processor produces for the image.
        cell_size: merged cell side in processor pixels (patch_size * spatial_merge_size).
        min_coverage: least fraction of a cell the object must cover, in (0, 1].

    Returns:
        `np.ndarray` of shape `(grid_h * grid_w,)`, int64, row-major (the order of the tower's merged output).
    """
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    grid_h, grid_w = grid_hw
    labels = np.full(grid_h * grid_w, BACKGROUND, dtype=np.int64)
    if not objects:
        return labels
    coverage = np.stack([
        cell_coverage(rle_decode(obj["rle"]), grid_h, grid_w, cell_size=cell_size, resize_dtype="float32").reshape(-1)
        for obj in objects
    ]) / 255.0  # (n_objects, cells)
    classes = []
    for obj in objects:
        if obj.get("label") not in class_names:
            raise ValueError(f"object label {obj.get('label')!r} is not one of the classes {list(class_names)}")
        classes.append(class_names.index(obj["label"]) + 1)
    best = coverage.argmax(0)
    covered = coverage.max(0) >= min_coverage
    labels[covered] = np.asarray(classes)[best[covered]]
    return labels


def load_cell_records(paths: Sequence[str | os.PathLike], image_dirs: Sequence[str | os.PathLike]) -> list[dict]:
    """Records of OVD-style JSONL files (one per image, every object with `rle` and `label`), each with its image path.

    Raises:
        ValueError: when the counts of files and folders differ, a file is empty, or an object lacks `rle`/`label`.
    """
    if len(paths) != len(image_dirs):
        raise ValueError(f"{len(paths)} data files but {len(image_dirs)} image folders: give one folder per file")
    records = []
    for path, folder in zip(paths, image_dirs):
        before = len(records)
        for lineno, rec in iter_jsonl(path, "vision pretraining file"):
            for obj in rec.get("objects", []):
                if "rle" not in obj or "label" not in obj:
                    raise ValueError(f"{path} line {lineno}: every object needs 'rle' and 'label' for cell labels")
            records.append({"image": os.path.join(folder, rec["image"]), "objects": rec.get("objects", [])})
        if len(records) == before:
            raise ValueError(f"{path} holds no records")
    return records


def load_coco_cell_records(
    coco_paths: Sequence[str | os.PathLike], image_dirs: Sequence[str | os.PathLike], attributes: Sequence[str]
) -> list[dict]:
    """Records of COCO instance files whose annotations carry `attributes` (as the shapes' `coco_{split}.json`), one per
    image, each object labelled by its attribute values joined by spaces (e.g. ("colour", "kind") -> "red circle").

    Raises:
        ValueError: when the counts of files and folders differ, a file has no images, or an annotation lacks an
            attribute.
    """
    if len(coco_paths) != len(image_dirs):
        raise ValueError(f"{len(coco_paths)} COCO files but {len(image_dirs)} image folders: give one folder per file")
    records = []
    for path, folder in zip(coco_paths, image_dirs):
        coco = json.loads(Path(path).read_text())
        if not coco.get("images"):
            raise ValueError(f"{path} holds no images")
        by_id = {im["id"]: {"image": os.path.join(folder, im["file_name"]), "objects": []} for im in coco["images"]}
        for ann in coco.get("annotations", []):
            values = ann.get("attributes", {})
            missing = [a for a in attributes if a not in values]
            if missing:
                raise ValueError(f"{path}: annotation {ann.get('id')} has no attribute(s) {missing}")
            by_id[ann["image_id"]]["objects"].append(
                {"rle": ann["segmentation"], "label": " ".join(str(values[a]) for a in attributes)}
            )
        records.extend(by_id.values())
    return records


class CellClassDataset(torch.utils.data.Dataset):
    """One image per item: processor pixels, its grid and the class of each merged cell.

    Items: `pixel_values` `(N_patches, C*T*P*P)`, `image_grid_thw` `(1, 3)`, `labels` `(N_cells,)`.
    """

    def __init__(self, records: Sequence[dict], image_processor: Any, class_names: Sequence[str],
                 min_coverage: float = 0.3) -> None:
        self.records = list(records)
        self.image_processor = image_processor
        self.class_names = list(class_names)
        self.min_coverage = min_coverage
        self.merge = int(image_processor.merge_size)
        self.cell_size = int(image_processor.patch_size) * self.merge

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rec = self.records[i]
        image = load_image(rec["image"])
        batch = self.image_processor(images=[image], return_tensors="pt")
        grid = batch["image_grid_thw"]
        grid_hw = (int(grid[0, 1]) // self.merge, int(grid[0, 2]) // self.merge)
        if (grid_hw[0] * self.cell_size, grid_hw[1] * self.cell_size) != (image.height, image.width):
            raise ValueError(
                f"{rec['image']}: the processor resizes {image.width}x{image.height} to a {grid_hw[1]}x{grid_hw[0]} "
                f"cell grid; pretrain on images whose sides are multiples of {self.cell_size} px and set "
                f"min_pixels = max_pixels = width * height"
            )
        labels = cell_class_labels(rec["objects"], self.class_names, grid_hw, self.cell_size, self.min_coverage)
        return {"pixel_values": batch["pixel_values"], "image_grid_thw": grid, "labels": torch.from_numpy(labels)}


def collate_cells(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate items along dim 0 (the tower takes images packed, as Qwen2.5-VL's processor gives them)."""
    return {key: torch.cat([item[key] for item in items]) for key in ("pixel_values", "image_grid_thw", "labels")}


def cell_pixel_targets(pixel_values: torch.Tensor, config: Any, pool: int = 2) -> torch.Tensor:
    """Each merged cell's pixels, average-pooled `pool` x `pool`: the reconstruction target of vision pretraining.

    Args:
        pixel_values (`torch.Tensor` of shape `(N_patches, C*T*P*P)`): processor output (normalised; patches of a
            merged cell are consecutive, cells row-major, as Qwen2.5-VL's processor emits them).
        config: the vision config (`in_channels`, `temporal_patch_size`, `patch_size`, `spatial_merge_size`).

    Returns:
        `torch.Tensor` of shape `(N_patches / merge^2, merge^2 * C * (P / pool)^2)` (first frame of each patch).
    """
    c, t, p, m = config.in_channels, config.temporal_patch_size, config.patch_size, config.spatial_merge_size
    if p % pool:
        raise ValueError(f"patch_size {p} is not divisible by the pooling {pool}")
    frames = pixel_values.float().view(-1, c, t, p, p)[:, :, 0]  # N x C x P x P
    pooled = nn.functional.avg_pool2d(frames, pool)  # N x C x P/pool x P/pool
    return pooled.reshape(-1, m * m * pooled[0].numel())


def cell_positions(image_grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """Centre of every merged cell as a fraction of its image's height and width, (N_cells, 2) as (row, col) in (0, 1),
    images concatenated, cells row-major (the order of the tower's merged output)."""
    out = []
    for _, h, w in image_grid_thw.tolist():
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        rows = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh
        cols = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw
        out.append(torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2))
    return torch.cat(out)


class VisionCellPretrainer(nn.Module):
    """The Qwen2.5-VL vision tower with three linear heads on its merged output (one row per cell): the cell's class
    (cross-entropy), its pooled pixels (`cell_pixel_targets`) and its position in the image (`cell_positions`), the
    last two by mean squared error with weights `pixel_loss_weight` and `position_loss_weight`.

    The class alone is not enough (docs/results.md): it collapses the features of all cells of one kind together, and
    PaDT training from such a tower stalled, since the features are also the VRT prototypes the LLM points with. The
    pixels keep colour and local geometry in the features, and the position the place of the cell (a random tower
    carries it through its rotary attention, and PaDT training from a tower without it stalled as well).
    """

    def __init__(self, visual: nn.Module, num_classes: int, pixel_loss_weight: float = 1.0,
                 position_loss_weight: float = 10.0, pool: int = 2) -> None:
        super().__init__()
        self.visual = visual
        self.pool = pool
        self.pixel_loss_weight = pixel_loss_weight
        self.position_loss_weight = position_loss_weight
        cfg = visual.config
        target_size = cfg.spatial_merge_size**2 * cfg.in_channels * (cfg.patch_size // pool) ** 2
        self.head = nn.Linear(cfg.out_hidden_size, num_classes)
        self.pixel_head = nn.Linear(cfg.out_hidden_size, target_size)
        self.position_head = nn.Linear(cfg.out_hidden_size, 2)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """pixel_values (N_patches, C*T*P*P), image_grid_thw (I, 3), labels (N_cells,) -> logits (N_cells, classes)."""
        cells = self.visual(pixel_values.to(self.head.weight.dtype), grid_thw=image_grid_thw).pooler_output
        logits = self.head(cells)
        out = {"logits": logits}
        if labels is not None:
            target = cell_pixel_targets(pixel_values, self.visual.config, self.pool).to(cells.dtype)
            pixel_loss = nn.functional.mse_loss(self.pixel_head(cells), target)
            where = cell_positions(image_grid_thw, self.visual.config.spatial_merge_size).to(cells.device, cells.dtype)
            position_loss = nn.functional.mse_loss(self.position_head(cells), where)
            out["loss"] = (nn.functional.cross_entropy(logits, labels) + self.pixel_loss_weight * pixel_loss
                           + self.position_loss_weight * position_loss)
        return out


@torch.no_grad()
def cell_feature_rms(visual: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Root mean square of the tower's merged output (the LLM's image embeddings) on a `collate_cells` batch."""
    cells = visual(batch["pixel_values"].to(visual.dtype), grid_thw=batch["image_grid_thw"]).pooler_output
    return float(cells.float().pow(2).mean().sqrt())


@torch.no_grad()
def rescale_cell_features(visual: nn.Module, factor: float) -> None:
    """Multiply the tower's merged output by `factor` (the merger's last Linear, weight and bias)."""
    mlp = getattr(getattr(visual, "merger", None), "mlp", None)
    layer = mlp[-1] if isinstance(mlp, nn.Sequential) else None
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{type(visual).__name__} has no merger.mlp ending in a Linear (a Qwen2.5-VL vision tower?)")
    layer.weight.mul_(factor)
    layer.bias.mul_(factor)


@torch.no_grad()
def cell_accuracy(
    pretrainer: VisionCellPretrainer, dataset: CellClassDataset, batch_size: int = 32
) -> dict[str, float]:
    """Accuracy over all cells and, on object cells, of the category alone (background logit ignored)."""
    pretrainer.eval()
    right = total = fg_right = fg_total = 0
    for start in range(0, len(dataset), batch_size):
        batch = collate_cells([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = pretrainer(batch["pixel_values"], batch["image_grid_thw"])["logits"]
        labels = batch["labels"]
        right += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
        fg = labels != BACKGROUND
        fg_right += int((logits[fg][:, 1:].argmax(-1) + 1 == labels[fg]).sum())
        fg_total += int(fg.sum())
    return {"cell_accuracy": right / max(total, 1), "object_cell_category_accuracy": fg_right / max(fg_total, 1)}


def pretrain_vision(
    model_dir: str | os.PathLike,
    train_records: Sequence[dict],
    class_names: Sequence[str],
    out_dir: str | os.PathLike,
    training_args: Any,
    eval_records: Sequence[dict] | None = None,
    min_coverage: float = 0.3,
) -> dict[str, float]:
    """Pretrain `model_dir`'s vision tower on its cells' classes, pixels and positions (`VisionCellPretrainer`), scale
    its merged features back to their starting size, and save the whole model + processor to `out_dir`.

    Args:
        model_dir: a PaDT model folder (weights and processor), e.g. `padt.testing.models --training-start` output.
        train_records: `load_cell_records` output of the training files.
        class_names: object categories (cell class k + 1).
        out_dir: destination; the Trainer's checkpoints go to `out_dir/trainer` (a rerun resumes from the last).
        training_args: `transformers.TrainingArguments` (steps, batch size, learning rate...); its `output_dir` is
            set to `out_dir/trainer`.
        eval_records: held-out records to report the cell accuracy on (not trained on), optional.

    Returns:
        the final training loss, the feature scale before training and after it (before the rescaling) and, with
        `eval_records`, the accuracies of `cell_accuracy`.
    """
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    from padt.model.backbones import padt_classes_for
    from padt.processing.qwen import load_processor

    model = padt_classes_for(model_dir)[1].from_pretrained(model_dir)
    processor = load_processor(model_dir)
    image_processor = processor.image_processor
    pretrainer = VisionCellPretrainer(model.model.visual, len(class_names) + 1)
    train_set = CellClassDataset(train_records, image_processor, class_names, min_coverage)
    trainer_dir = os.path.join(out_dir, "trainer")
    training_args.output_dir = trainer_dir
    training_args.remove_unused_columns = False
    # Scale of the merged features before training, restored afterwards. They are the LLM's image embeddings and,
    # through the zero-init prototype norm, the VRT rows of its output head; pretraining makes them 15-30x larger, and
    # PaDT training should start with VRT logits on the scale of the text logits, as from a random tower.
    probe = collate_cells([train_set[i] for i in range(min(16, len(train_set)))])
    start_rms = cell_feature_rms(model.model.visual, probe)
    trainer = Trainer(model=pretrainer, args=training_args, train_dataset=train_set, data_collator=collate_cells)
    resume = get_last_checkpoint(trainer_dir) if os.path.isdir(trainer_dir) else None
    if resume:
        logger.info("resuming vision pretraining from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    report = {"train_loss": float(result.training_loss)}
    if eval_records:
        report.update(cell_accuracy(pretrainer, CellClassDataset(eval_records, image_processor, class_names,
                                                                 min_coverage)))
    trained_rms = cell_feature_rms(model.model.visual, probe)
    rescale_cell_features(model.model.visual, start_rms / trained_rms)
    report.update(cell_feature_rms_before=start_rms, cell_feature_rms_trained=trained_rms)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # the tower inside `pretrainer` is the model's own module
    processor.save_pretrained(out_dir)
    return report
