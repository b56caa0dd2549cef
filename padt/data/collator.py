"""`PaDTCollator`: dataset items -> the training batch that `compute_padt_loss` consumes (steps 1-5 of the authors'
`compute_loss` in `src/PaDT/trainer/padt_sft_trainer.py`; docs/method.md#the-training-step-and-losses).

Per batch: sample each object's VRT cells (`padt.data.sampling`, seeded by (seed, epoch, dataset index)), build the
answer text + eos, tokenise the chat-templated prompts with their images (left-padded, `PaDTProcessor`) and the
completions as text only (right-padded, `PaDTProcessor.encode` maps `<|VRT_k|>` to ``V + k``), make VRT ids global,
and derive the targets: ``vrt_rows``, ``robust_cell_mask`` and the per-object ``objects`` dicts (box, gt mask).

Batch keys (B rows, P prompt columns, C completion columns; all CPU tensors unless noted):

- ``input_ids`` (B, P + C) long, global VRT ids; ``attention_mask`` (B, P + C) long; ``mm_token_type_ids`` (B, P + C);
- ``pixel_values`` (N_patches, D); ``image_grid_thw`` (num_images, 3); ``image_sample_idx`` (num_images,) long;
- ``prompt_length`` int P; ``completion_mask`` (B, C) long (completion tokens incl. eos);
- ``vrt_rows`` (N_vrt, 2) long: (row b, completion index t) of every VRT target, row-major over (b, t);
- ``robust_cell_mask`` (N_vrt, N_cells) bool: True at the *global* cells of the target's object's other foreground
  cells (the picked cell itself False); all False with ``robust=False``;
- ``objects``: list (B) of lists, one dict per ``<|Obj_k|>`` placeholder in text order: ``vrt_positions``,
  ``vrt_cells`` (global), ``fg_cells`` (global), ``box_xyxy`` (4,) float32, ``mask`` (up*h, up*w) float32 or None,
  ``label``, ``mention`` (the answer's words introducing the object, `padt.data.sampling.placeholder_mentions`),
  ``task``;
- ``num_objects`` int, ``num_tokens`` int (non-pad tokens); ``sample_index`` (B,) long (dataset indices).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from padt.data.cells import gt_mask_at_patch_grid
from padt.data.sampling import (
    NumVRT,
    build_answer,
    check_num_vrt,
    placeholder_ids,
    placeholder_mentions,
    sample_object_vrts,
    sample_rng,
)
from padt.processing.vrt import local_to_global_cells


def robust_cell_mask(objects: Sequence[Sequence[Mapping[str, Any]]], num_cells: int) -> torch.Tensor:
    """Robust-CE mask (docs/method.md#the-training-step-and-losses): one row per VRT target, rows ordered by batch
    row, then object, then VRT.

    Args:
        objects: per batch row, per object (text order), dicts with ``vrt_cells`` and ``fg_cells`` (global cells).
        num_cells: total merged cells of the batch's images.
    Returns:
        `(N_vrt, num_cells)` bool: row j is True at the object's foreground cells except row j's picked cell.
    """
    flat = [obj for row_objects in objects for obj in row_objects]
    mask = torch.zeros(sum(len(obj["vrt_cells"]) for obj in flat), num_cells, dtype=torch.bool)
    start = 0
    for obj in flat:
        picked = torch.as_tensor([int(c) for c in obj["vrt_cells"]], dtype=torch.long)
        stop = start + len(picked)
        mask[start:stop, torch.as_tensor([int(c) for c in obj["fg_cells"]], dtype=torch.long)] = True
        mask[torch.arange(start, stop), picked] = False
        start = stop
    return mask


class PaDTCollator:
    """Build training batches from `padt.data.PaDTDataset` items.

    Args:
        processor (`padt.processing.processor.PaDTProcessor`): chat template, images, VRT-aware text encoding, V.
        num_vrt: VRTs per object: an int, or ``"all"`` / -1 for all foreground cells (an ablation).
        seed: VRT sampling seed; with `set_epoch`, a sample's picks depend only on (seed, epoch, dataset index).
        robust: build the robust-CE mask (False: all-False mask, the "no robust CE" ablation).
        max_length: longest allowed prompt + completion per sample; a longer sample raises `ValueError` (cutting
            a completion would corrupt its VRT targets).
        mask_upscale: gt mask resolution per 14-px patch, the decoder's mask upscale (4 for PaDT).

    The epoch must be set (`set_epoch`) before a DataLoader iterator is created: worker processes copy the collator
    when they start, so with ``persistent_workers=True`` they would keep the epoch they started with.
    """

    def __init__(self, processor, *, num_vrt: NumVRT = 5, seed: int = 42, robust: bool = True,
                 max_length: int | None = None, mask_upscale: int = 4):
        for attr in ("encode", "codec", "vrt_base_id", "tokenizer"):
            if not hasattr(processor, attr):
                raise TypeError(f"processor must be a padt.processing.processor.PaDTProcessor (missing {attr!r}), "
                                f"got {type(processor).__name__}")
        self.processor = processor
        self.num_vrt = check_num_vrt(num_vrt)
        self.seed = int(seed)
        self.robust = bool(robust)
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"max_length must be positive or None, got {max_length}")
        self.max_length = None if max_length is None else int(max_length)
        if isinstance(mask_upscale, bool) or int(mask_upscale) < 1:
            raise ValueError(f"mask_upscale must be a positive int, got {mask_upscale}")
        self.mask_upscale = int(mask_upscale)
        self.epoch = 0
        tok = processor.tokenizer
        if tok.eos_token is None or tok.pad_token_id is None:
            raise ValueError("the tokenizer needs an eos token (appended to every answer) and a pad token")
        self.eos_token = tok.eos_token
        self.pad_token_id = int(tok.pad_token_id)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose VRT picks the next batches use."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def sample_picks(self, example: Mapping[str, Any]) -> dict[int, list[int]]:
        """VRT cells of every object the example's answer names: ``{k: local cells}``."""
        rng = sample_rng(self.seed, self.epoch, int(example["index"]))
        cells = [obj["cells"] for obj in example["objects"]]
        return sample_object_vrts(example["answer_template"], cells, self.num_vrt, rng)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self.collate(examples, [self.sample_picks(ex) for ex in examples])

    # ------------------------------------------------------------------ the batch
    def collate(self, examples: Sequence[Mapping[str, Any]], picks: Sequence[Mapping[int, Sequence[int]]]) -> dict:
        """Build the batch with given VRT picks (``picks[b][k]`` = local cells of object k of example b)."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        if len(picks) != len(examples):
            raise ValueError(f"got picks for {len(picks)} examples but {len(examples)} examples")
        proc, V = self.processor, self.processor.vrt_base_id
        prompt = proc([ex["image"] for ex in examples], [ex["prompt"] for ex in examples],
                      add_generation_prompt=True, global_vrt_ids=True, return_image_sample_idx=True)
        grid_thw, sample_idx = prompt["image_grid_thw"], prompt["image_sample_idx"]
        B, P = prompt["input_ids"].shape
        row_images = proc.codec.row_images(B, grid_thw, sample_idx)
        self._check_grids(examples, row_images, grid_thw)

        answers = [build_answer(ex["answer_template"], picks[b]) + self.eos_token for b, ex in enumerate(examples)]
        encoded = [proc.encode(text) for text in answers]
        self._check_lengths(examples, prompt["attention_mask"], encoded)
        C = max(len(ids) for ids in encoded)
        local = torch.full((B, C), self.pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros(B, C, dtype=torch.long)
        for b, ids in enumerate(encoded):
            local[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            completion_mask[b, : len(ids)] = 1
        completion = proc.codec.to_global(local, grid_thw, sample_idx)

        ranges = proc.codec.row_cell_ranges(B, grid_thw, sample_idx)
        objects = [self._row_objects(ex, picks[b], encoded[b], ranges[b], grid_thw[row_images[b][0]], V)
                   for b, ex in enumerate(examples)]
        num_cells = int(proc.codec.num_cells(grid_thw).sum())
        vrt_rows = (completion >= V).nonzero()
        robust = robust_cell_mask(objects, num_cells)
        if robust.shape[0] != vrt_rows.shape[0]:
            raise RuntimeError(f"{robust.shape[0]} robust-mask rows for {vrt_rows.shape[0]} VRT targets")
        if not self.robust:
            robust = torch.zeros_like(robust)

        mm = prompt["mm_token_type_ids"]
        return {
            "input_ids": torch.cat([prompt["input_ids"], completion], dim=1),
            "attention_mask": torch.cat([prompt["attention_mask"], completion_mask], dim=1),
            "mm_token_type_ids": torch.cat([mm, torch.zeros(B, C, dtype=mm.dtype)], dim=1),
            "pixel_values": prompt["pixel_values"],
            "image_grid_thw": grid_thw,
            "image_sample_idx": sample_idx,
            "prompt_length": int(P),
            "completion_mask": completion_mask,
            "vrt_rows": vrt_rows,
            "robust_cell_mask": robust,
            "objects": objects,
            "num_objects": sum(len(o) for o in objects),
            "num_tokens": int(prompt["attention_mask"].sum() + completion_mask.sum()),
            "sample_index": torch.tensor([int(ex["index"]) for ex in examples], dtype=torch.long),
        }

    def _row_objects(self, example, picks, ids: list[int], ranges, grid_thw_row, V: int) -> list[dict]:
        """Objects of one row in text order, with completion positions of their VRTs and global cells."""
        positions = [t for t, tok in enumerate(ids) if tok >= V]
        _, patch_h, patch_w = (int(x) for x in grid_thw_row)
        out, used, masks = [], 0, {}
        mentions = placeholder_mentions(example["answer_template"])
        for k in placeholder_ids(example["answer_template"]):
            obj, cells = example["objects"][k], list(picks[k])
            mask = None
            if obj.get("rle") is not None:
                if k not in masks:
                    masks[k] = torch.from_numpy(gt_mask_at_patch_grid(obj["rle"], patch_h, patch_w, self.mask_upscale))
                mask = masks[k]
            out.append({
                "vrt_positions": positions[used: used + len(cells)],
                "vrt_cells": local_to_global_cells(ranges, cells),
                "fg_cells": local_to_global_cells(ranges, list(obj["cells"])),
                "box_xyxy": torch.tensor([float(v) for v in obj["box"]], dtype=torch.float32),
                "mask": mask,
                "label": obj.get("label") or "",
                "mention": mentions[k],
                "task": example["task"],
            })
            used += len(cells)
        if used != len(positions):
            raise ValueError(f"{_name(example)}: the completion holds {len(positions)} VRT tokens but its objects "
                             f"account for {used}; does the prompt-free answer text contain VRT strings?")
        return out

    def _check_grids(self, examples, row_images: list[list[int]], grid_thw: torch.Tensor) -> None:
        for b, ex in enumerate(examples):
            if len(row_images[b]) != 1:
                raise ValueError(f"{_name(ex)}: training samples hold exactly one image, got {len(row_images[b])}")
            merged = self.processor.codec.merged_grid(grid_thw[row_images[b][0]])[1:]
            if "grid" in ex and tuple(ex["grid"]) != merged:
                raise ValueError(
                    f"{_name(ex)}: the dataset derived cells on a {tuple(ex['grid'])} merged grid but the processor "
                    f"made {merged}; build the dataset with the collator's processor geometry"
                )

    def _check_lengths(self, examples, prompt_mask: torch.Tensor, encoded: list[list[int]]) -> None:
        if self.max_length is None:
            return
        for b, ex in enumerate(examples):
            total = int(prompt_mask[b].sum()) + len(encoded[b])
            if total > self.max_length:
                raise ValueError(
                    f"{_name(ex)}: prompt + completion is {total} tokens > max_length {self.max_length} "
                    f"(completion {len(encoded[b])} tokens); cutting it would corrupt its VRT targets: raise "
                    "max_length, lower max_pixels or drop the sample"
                )


def _name(example: Mapping[str, Any]) -> str:
    where = example.get("where")
    return f"sample {example.get('index')}" + (f" ({where})" if where else "")
