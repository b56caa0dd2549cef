"""Build model inputs for tiny PaDT models by hand (no tokenizer): text ids, image spans and random pixels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    """One batch row: `images` as (h, w) patch grids; `text` ids before the images, `tail` ids after them (may hold
    *local* VRT ids as `("vrt", image_index_in_sample, cell)` tuples)."""

    images: list[tuple[int, int]] = field(default_factory=list)
    text: list[int] = field(default_factory=lambda: [1, 2, 3])
    tail: list = field(default_factory=lambda: [4, 5])
    seed: int = 0  # pixels depend on the sample only, so a sample alone and in a batch sees the same image


def build_batch(config, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw` with global VRT ids."""
    merge = config.spatial_merge_size
    patch_dim = 3 * config.vision_config.temporal_patch_size * config.patch_size**2
    V = config.vrt_base_id
    rows, pixels, grids, offset = [], [], [], 0
    for s in samples:
        ids = list(s.text)
        starts = []
        gen = torch.Generator().manual_seed(s.seed)
        for h, w in s.images:
            starts.append(offset)
            ids += [config.vision_start_token_id] + [config.image_token_id] * (h * w // merge**2)
            ids += [config.vision_end_token_id]
            pixels.append(torch.randn(h * w, patch_dim, generator=gen))
            grids.append([1, h, w])
            offset += h * w // merge**2
        for tok in s.tail:
            ids.append(V + starts[tok[1]] + tok[2] if isinstance(tok, tuple) else tok)
        rows.append(ids)
    length = max(len(r) for r in rows)
    pad = config.text_config.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.tensor(grids)
    return batch
