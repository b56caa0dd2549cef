"""VRT (visual reference token) id arithmetic: no tokenizer entries needed.

A VRT names one *merged* cell of one image (a ``merge x merge`` group of ViT patches). Ids are pure arithmetic
on the base id ``V`` = the number of rows of the text embedding table (``config.vocab_size``):

- **local id** of cell ``k`` of a batch row: ``V + k``, written ``<|VRT_k|>``. Cells are numbered row-major over
  the image's merged grid (``k = row * (w // merge) + col``, frames stacked for ``t > 1``). When a row holds
  several images, its local ids are numbered across them in order: ``k < n0`` is the first image,
  ``n0 <= k < n0 + n1`` the second, and so on.
- **global id**: ``V + off_i + k_i``, where ``off_i`` is the number of cells of all earlier images in the batch
  (the row of image ``i``'s prototype in the per-batch VRT table) and ``k_i`` the cell inside image ``i``.

`VRTCodec` converts between the two per batch row, given which row each image belongs to
(``image_sample_idx``; the authors' convention "image i is row i" is the default). It never mutates its inputs
and raises `ValueError` naming the row and the id for a VRT that is not a cell of one of its row's images.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

VRT_TOKEN_PATTERN = re.compile(r"<\|VRT_(\d+)\|>")


def vrt_token(k: int) -> str:
    """String form of local VRT ``k``: ``<|VRT_k|>``."""
    return f"<|VRT_{int(k)}|>"


def parse_vrt_token(token: str) -> int:
    """Inverse of `vrt_token`: ``"<|VRT_12|>" -> 12``. Raises `ValueError` for anything else."""
    m = VRT_TOKEN_PATTERN.fullmatch(token)
    if m is None:
        raise ValueError(f"{token!r} is not a VRT token string (expected '<|VRT_k|>')")
    return int(m.group(1))


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


class VRTCodec:
    """Local <-> global VRT id conversion and cell geometry, by arithmetic.

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

    # ------------------------------------------------------------------ strings
    token = staticmethod(vrt_token)
    parse_token = staticmethod(parse_vrt_token)
    pid2vrt = staticmethod(pid2vrt)

    def id_to_token(self, token_id: int) -> str:
        """``V + k -> "<|VRT_k|>"``; `ValueError` for a non-VRT id."""
        if token_id < self.vrt_base_id:
            raise ValueError(f"id {token_id} is not a VRT id (VRT ids start at {self.vrt_base_id})")
        return vrt_token(token_id - self.vrt_base_id)

    def token_to_id(self, token: str) -> int:
        """``"<|VRT_k|>" -> V + k``."""
        return self.vrt_base_id + parse_vrt_token(token)

    def is_vrt(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of VRT ids (``id >= V``), same shape as ``ids``."""
        return torch.as_tensor(ids) >= self.vrt_base_id

    # ------------------------------------------------------------------ grid geometry
    def merged_grid(self, grid_thw: Sequence[int] | torch.Tensor) -> tuple[int, int, int]:
        """``(t, h, w)`` in patches -> ``(t, h // merge, w // merge)`` in cells; `ValueError` if not divisible."""
        t, h, w = (int(x) for x in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw))
        m = self.spatial_merge_size
        if h % m or w % m:
            raise ValueError(f"image grid (t={t}, h={h}, w={w}) is not divisible by spatial_merge_size={m}")
        return t, h // m, w // m

    def cells_per_image(self, image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> list[int]:
        """Cells (VRTs) per image, ``t*h*w // merge**2``, as plain ints; `ValueError` if h or w is not divisible."""
        m = self.spatial_merge_size
        out = []
        for t, h, w in _grid_rows(image_grid_thw):
            if h % m or w % m:
                raise ValueError(f"image grid (t={t}, h={h}, w={w}) is not divisible by spatial_merge_size={m}")
            out.append(t * h * w // (m * m))
        return out

    def num_cells(self, image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> torch.Tensor:
        """Cells (VRTs) per image, ``t*h*w // merge**2``: `(N,)` int64."""
        return torch.tensor(self.cells_per_image(image_grid_thw), dtype=torch.long)

    def offsets(self, image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> torch.Tensor:
        """Exclusive cumulative cell counts: `(N,)`, ``off_i`` = cells of all images before image ``i``."""
        n = self.num_cells(image_grid_thw)
        return torch.cumsum(n, 0) - n

    def cell_to_rc(self, k: int | torch.Tensor, grid_thw: Sequence[int] | torch.Tensor):
        """Cell index -> ``(row, col)`` on the merged grid (frames stacked: ``row`` runs over ``t * h // merge``).

        Works on ints and on integer tensors (returns a pair of tensors).
        """
        t, hm, wm = self.merged_grid(grid_thw)
        if not torch.is_tensor(k) and not 0 <= int(k) < t * hm * wm:
            raise ValueError(f"cell {k} is outside the {t}x{hm}x{wm} merged grid")
        return k // wm, k % wm

    def rc_to_cell(self, row: int | torch.Tensor, col: int | torch.Tensor, grid_thw: Sequence[int] | torch.Tensor):
        """``(row, col)`` on the merged grid -> cell index ``row * (w // merge) + col``."""
        t, hm, wm = self.merged_grid(grid_thw)
        if not torch.is_tensor(row) and not (0 <= int(row) < t * hm and 0 <= int(col) < wm):
            raise ValueError(f"(row={row}, col={col}) is outside the {t}x{hm}x{wm} merged grid")
        return row * wm + col

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
            n = self.num_cells(image_grid_thw)
            off = torch.cumsum(n, 0) - n
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
        off = [0] * len(n)
        for i in range(1, len(n)):
            off[i] = off[i - 1] + n[i - 1]
        return [[(off[i], n[i]) for i in imgs] for imgs in self.row_images(batch_size, image_grid_thw, image_sample_idx)]

    def row_global_cells(
        self,
        batch_size: int,
        image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
        image_sample_idx: torch.Tensor | Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Per row, the global cell indices (``global id - V``) of its local ids ``0, 1, ...`` in order."""
        out = []
        for ranges in self.row_cell_ranges(batch_size, image_grid_thw, image_sample_idx):
            parts = [torch.arange(g, g + c) for g, c in ranges]
            out.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))
        return out


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
