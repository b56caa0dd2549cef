"""VRT (visual reference token) id arithmetic: no tokenizer entries needed.

A VRT names one *merged* cell of one image (a ``merge x merge`` group of ViT patches). Ids are pure arithmetic
on the base id ``V`` = the number of rows of the text embedding table (``config.vocab_size``;
docs/method.md#vrt-ids-and-the-extended-vocabulary):

- **local id** of cell ``k`` of a batch row: ``V + k``, written ``<|VRT_k|>``. Cells are numbered row-major over
  the image's merged grid (``k = row * (w // merge) + col``, frames stacked for ``t > 1``). When a row holds
  several images, its local ids are numbered across them in order: ``k < n0`` is the first image,
  ``n0 <= k < n0 + n1`` the second, and so on.
- **global id**: ``V + off_i + k_i``, where ``off_i`` is the number of cells of all earlier images in the batch
  (the row of image ``i``'s prototype in the per-batch VRT table) and ``k_i`` the cell inside image ``i``.

`VRTCodec` converts between the two per batch row, given which row each image belongs to
(``image_sample_idx``; the authors' convention "image i is row i" is the default). It never mutates its inputs
and raises `ValueError` naming the row and the id for a VRT that is not a cell of one of its row's images.

This module is the one place for the cell arithmetic of a batch: cells per image (`cells_per_image`, also used by
the model's prefill), their offsets (`cell_offsets`) and each row's cell ranges (`VRTCodec.row_cell_ranges`). How an
image's pixel size becomes its patch grid is `padt.geometry.grids`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

VRT_TOKEN_PATTERN = re.compile(r"<\|VRT_(\d+)\|>")


def pid2vrt(patch_ids: int | Iterable[int] | torch.Tensor) -> str:
    """Concatenated VRT strings for cell indices, no separators: ``[3, 7] -> "<|VRT_3|><|VRT_7|>"``."""
    if torch.is_tensor(patch_ids):
        patch_ids = patch_ids.reshape(-1).tolist()
    elif isinstance(patch_ids, int):
        patch_ids = [patch_ids]
    return "".join(f"<|VRT_{int(k)}|>" for k in patch_ids)


def _grid_rows(image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> list[list[int]]:
    """Image grids as a list of ``[t, h, w]`` int lists (no image -> ``[]``)."""
    if image_grid_thw is None:
        return []
    rows = image_grid_thw.tolist() if torch.is_tensor(image_grid_thw) else [list(r) for r in image_grid_thw]
    if len(rows) == 3 and all(isinstance(x, int) for x in rows):
        rows = [rows]
    if any(len(r) != 3 for r in rows):
        raise ValueError(f"image_grid_thw must have shape (num_images, 3), got {rows}")
    return [[int(x) for x in r] for r in rows]


def merged_grid(
    grid_thw: Sequence[int] | torch.Tensor, spatial_merge_size: int, *, image: int = 0, cell_size_px: int | None = None
) -> tuple[int, int, int]:
    """One image's patch grid ``(t, h, w)`` -> its merged grid ``(t, h // merge, w // merge)`` in cells.

    `ValueError` unless ``h`` and ``w`` are positive multiples of the merge size; the message names the image
    (``image``) and, given ``cell_size_px``, the smallest image size (one cell).
    """
    t, h, w = (int(x) for x in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw))
    m = int(spatial_merge_size)
    if h < m or w < m or h % m or w % m:
        hint = "" if cell_size_px is None else (
            f"; every image must be at least {cell_size_px}x{cell_size_px} px after resizing (one VRT cell)")
        raise ValueError(f"image {image} has a patch grid (t, h, w) = {(t, h, w)} that is not divisible into whole "
                         f"merged {m}x{m} cells (spatial_merge_size={m}){hint}")
    return t, h // m, w // m


def cells_per_image(
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
    spatial_merge_size: int,
    *,
    cell_size_px: int | None = None,
) -> list[int]:
    """Cells (VRTs) per image, ``t * h * w // merge**2``, as plain ints (one host copy: this runs on every prefill).

    `ValueError` for an image that is not a whole number of merged cells (see `merged_grid`).
    """
    out = []
    for i, thw in enumerate(_grid_rows(image_grid_thw)):
        t, hm, wm = merged_grid(thw, spatial_merge_size, image=i, cell_size_px=cell_size_px)
        out.append(t * hm * wm)
    return out


def cell_offsets(cells: Sequence[int]) -> list[int]:
    """Exclusive cumulative cell counts: ``off[i]`` = cells of all images before image ``i`` (its first global cell,
    i.e. its first row in the batch's prototype table)."""
    out, total = [], 0
    for n in cells:
        out.append(total)
        total += int(n)
    return out


class VRTCodec:
    """Local <-> global VRT id conversion and the cells of a batch's images, by arithmetic.

    Args:
        vrt_base_id (`int`): V, the id of `<|VRT_0|>` (rows of the text embedding table, `config.vocab_size`).
        spatial_merge_size (`int`): ViT patches merged per cell side (2 for Qwen2.5-VL).
    """

    def __init__(self, vrt_base_id: int, spatial_merge_size: int = 2):
        if int(vrt_base_id) <= 0:
            raise ValueError(f"vrt_base_id must be positive, got {vrt_base_id}")
        if int(spatial_merge_size) <= 0:
            raise ValueError(f"spatial_merge_size must be positive, got {spatial_merge_size}")
        self.vrt_base_id = int(vrt_base_id)
        self.spatial_merge_size = int(spatial_merge_size)

    def __repr__(self) -> str:
        return f"VRTCodec(vrt_base_id={self.vrt_base_id}, spatial_merge_size={self.spatial_merge_size})"

    # ------------------------------------------------------------------ cells of the batch's images
    def merged_grid(self, grid_thw: Sequence[int] | torch.Tensor) -> tuple[int, int, int]:
        """``(t, h, w)`` in patches -> ``(t, h // merge, w // merge)`` in cells; `ValueError` if not divisible."""
        return merged_grid(grid_thw, self.spatial_merge_size)

    def cells_per_image(self, image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> list[int]:
        """Cells (VRTs) per image, ``t*h*w // merge**2``, as plain ints; `ValueError` if h or w is not divisible."""
        return cells_per_image(image_grid_thw, self.spatial_merge_size)

    def num_cells(self, image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> torch.Tensor:
        """Cells (VRTs) per image, ``t*h*w // merge**2``: `(N,)` int64."""
        return torch.tensor(self.cells_per_image(image_grid_thw), dtype=torch.long)

    # ------------------------------------------------------------------ rows <-> images
    def row_images(
        self,
        batch_size: int,
        image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
        image_sample_idx: torch.Tensor | Sequence[int] | None = None,
    ) -> list[list[int]]:
        """Images of each batch row, in image order. Default: image ``i`` belongs to row ``i``."""
        num_images = len(_grid_rows(image_grid_thw))
        if image_sample_idx is None:
            if num_images != batch_size:
                raise ValueError(
                    f"{num_images} images for {batch_size} batch rows: the default maps image i to row i, so pass "
                    "image_sample_idx (num_images,) to say which row each image belongs to"
                )
            return [[i] for i in range(batch_size)]
        if torch.is_tensor(image_sample_idx):
            idx = [int(x) for x in image_sample_idx.reshape(-1).tolist()]
        else:
            idx = [int(x) for x in image_sample_idx]
        if len(idx) != num_images:
            raise ValueError(f"image_sample_idx has {len(idx)} entries but image_grid_thw has {num_images} images")
        rows: list[list[int]] = [[] for _ in range(batch_size)]
        for i, r in enumerate(idx):
            if not 0 <= r < batch_size:
                raise ValueError(f"image_sample_idx[{i}] = {r} is not a row of a batch of {batch_size}")
            rows[r].append(i)
        return rows

    def _convert(self, ids, image_grid_thw, image_sample_idx, to_global: bool) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        squeeze = ids.dim() == 1
        ids2 = ids[None] if squeeze else ids
        if ids2.dim() != 2:
            raise ValueError(f"ids must have shape (B, L) or (L,), got {tuple(ids.shape)}")
        out = ids2.clone()
        is_vrt = ids2 >= self.vrt_base_id
        if bool(is_vrt.any()):
            cells = self.cells_per_image(image_grid_thw)
            n = torch.tensor(cells, dtype=torch.long)
            off = torch.tensor(cell_offsets(cells), dtype=torch.long)
            rows = self.row_images(ids2.shape[0], image_grid_thw, image_sample_idx)
            for b in range(ids2.shape[0]):
                cols = is_vrt[b].nonzero(as_tuple=True)[0]
                if cols.numel() == 0:
                    continue
                vals = ids2[b, cols].cpu() - self.vrt_base_id
                imgs = rows[b]
                counts = n[imgs] if imgs else torch.zeros(0, dtype=torch.long)
                local_start = torch.cumsum(counts, 0) - counts  # start of each image's range in the row's local ids
                global_start = off[imgs] if imgs else torch.zeros(0, dtype=torch.long)
                if to_global:
                    j = torch.searchsorted(local_start + counts, vals, right=True)  # image of each local id
                    bad = j >= len(imgs)
                    starts_from, starts_to = local_start, global_start
                else:
                    # image whose global range holds the id (ranges of one row need not be contiguous)
                    inside = (vals[:, None] >= global_start[None]) & (vals[:, None] < (global_start + counts)[None])
                    bad = ~inside.any(dim=1)
                    j = inside.float().argmax(dim=1) if imgs else torch.zeros_like(vals)
                    starts_from, starts_to = global_start, local_start
                if bool(bad.any()):
                    first = int(ids2[b, cols[bad.nonzero()[0, 0]]])
                    kind = "local" if to_global else "global"
                    raise ValueError(
                        f"row {b}: {kind} VRT id {first} (<|VRT_{first - self.vrt_base_id}|>) is outside the row's "
                        f"images ({int(counts.sum())} cells over {len(imgs)} image(s))"
                    )
                new = vals - starts_from[j] + starts_to[j] + self.vrt_base_id
                out[b, cols] = new.to(out.device, out.dtype)
        return out[0] if squeeze else out

    def to_global(
        self,
        ids: torch.Tensor,
        image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
        image_sample_idx: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Local VRT ids -> global ids (new tensor).

        Args:
            ids (`torch.LongTensor` of shape `(B, L)` or `(L,)`): token ids; ids ``< V`` are left alone.
            image_grid_thw (`torch.LongTensor` of shape `(N, 3)`): patch grid of every image in the batch.
            image_sample_idx (`torch.LongTensor` of shape `(N,)`, *optional*): batch row of each image
                (default: image ``i`` is row ``i``, which needs ``N == B``).
        """
        return self._convert(ids, image_grid_thw, image_sample_idx, to_global=True)

    def to_local(
        self,
        ids: torch.Tensor,
        image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
        image_sample_idx: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Global VRT ids -> local ids (new tensor); the inverse of `to_global`, same arguments."""
        return self._convert(ids, image_grid_thw, image_sample_idx, to_global=False)

    def row_cell_ranges(
        self,
        batch_size: int,
        image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
        image_sample_idx: torch.Tensor | Sequence[int] | None = None,
    ) -> list[list[tuple[int, int]]]:
        """Per row, ``(global_start, num_cells)`` of each of its images in order (plain ints, cheap)."""
        n = self.cells_per_image(image_grid_thw)
        off = cell_offsets(n)
        return [[(off[i], n[i]) for i in imgs] for imgs in self.row_images(batch_size, image_grid_thw, image_sample_idx)]


def local_to_global_cells(ranges: Sequence[tuple[int, int]], cells: Sequence[int]) -> list[int]:
    """Local cell indices of one row -> global cell indices, given the row's ``(global_start, num_cells)`` ranges.

    Raises `ValueError` for a cell outside the row's images.
    """
    if len(ranges) == 1:  # the common case: one image per row
        g0, count = ranges[0]
        if cells and (min(cells) < 0 or max(cells) >= count):
            raise ValueError(f"VRT cells {[k for k in cells if not 0 <= k < count]} are outside the row's image "
                             f"({count} cells)")
        return [g0 + k for k in cells]
    out = []
    for k in cells:
        rem = k
        for g0, count in ranges:
            if 0 <= rem < count:
                out.append(g0 + rem)
                break
            rem -= count
        else:
            total = sum(c for _, c in ranges)
            raise ValueError(f"VRT cell {k} is outside the row's {len(ranges)} image(s) ({total} cells)")
    return out


def image_sample_idx_from_counts(images_per_row: Sequence[int]) -> torch.Tensor:
    """``[1, 0, 2] -> tensor([0, 2, 2])``: the row of each image when rows hold the given numbers of images."""
    counts = torch.as_tensor(list(images_per_row), dtype=torch.long)
    if bool((counts < 0).any()):
        raise ValueError(f"images_per_row must be >= 0, got {list(images_per_row)}")
    return torch.repeat_interleave(torch.arange(len(counts)), counts)
