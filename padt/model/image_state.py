"""`VRTImageState`: everything PaDT keeps about the images of a batch between forward calls.

The prototypes of a batch's images extend the vocabulary: global VRT id `V + j` is prototype row `j`
(docs/method.md#vrt-ids-and-the-extended-vocabulary). Which
rows a batch sample may read or emit is given by `cell_sample_idx`: prototype `j` belongs to batch row
`cell_sample_idx[j]`. This generalises the authors' per-image logit mask (which assumed image i = row i) to samples with
several images or none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from padt.model.vision import VisionFeatures


@dataclass
class VRTImageState:
    """Image state shared by the prefill and every decode step.

    Attributes:
        image_embeds (`torch.Tensor` of shape `(N_cells, H)`): raw merger output E_img (inserted at `<|image_pad|>`).
        prototypes (`torch.Tensor` of shape `(N_cells, H)`): visual reference prototypes P (VRT input rows and
            classifier rows); the authors call it `past_image_embeds` (`padt.legacy`).
        vision (`VisionFeatures`, *optional*): the decoder's inputs `high_res_embeds` and `pos_embeds` (below); when
            they come from the vision tower they are derived on first access (only the decoder reads them).
        image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`).
        image_sample_idx (`torch.LongTensor` of shape `(num_images,)`): batch row of each image.
        cell_sample_idx (`torch.LongTensor` of shape `(N_cells,)`): batch row of each prototype.
        batch_size (`int`): number of batch rows the state was built for.
        generating (`bool`): True while `generate` drives the state. Its forward calls then record
            `step_hidden_states`, trust the VRT ids that generate sampled, and leave the per-step outputs' derived
            fields (`past_logit_mask`, `past_high_res_image_embeds`, `past_visual_pe`) unset: generate returns them.
        step_hidden_states (`list` of `(B, 1, H)` tensors): during `generate`, the final-norm hidden state of the last
            position of every forward call, i.e. the state that predicted each generated token.
    """

    image_embeds: torch.Tensor | None
    prototypes: torch.Tensor
    vision: VisionFeatures | None
    image_grid_thw: torch.Tensor | None
    image_sample_idx: torch.Tensor
    cell_sample_idx: torch.Tensor
    batch_size: int
    generating: bool = False
    step_hidden_states: list[torch.Tensor] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)  # per-batch-size masks etc., built once for all steps

    @property
    def high_res_embeds(self) -> torch.Tensor | None:
        """`(N_patches, D_vit)`: pre-merger ViT features for the decoder; authors' `past_high_res_image_embeds`."""
        return None if self.vision is None else self.vision.high_res_embeds

    @property
    def pos_embeds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ViT rotary (cos, sin), each `(N_patches, head_dim_vit)`; authors' `past_visual_pe`."""
        return None if self.vision is None else self.vision.pos_embeds

    @property
    def num_cells(self) -> int:
        return int(self.prototypes.shape[0])

    def _cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        """`build()` once per key for the state's lifetime (the prefill builds it, every decode step reuses it)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.batch_size != 0:
            raise ValueError(
                f"the image state was built for {self.batch_size} batch rows, got {batch_size}; pass the same batch "
                "(or a repeat-interleaved expansion of it) that the images came with"
            )

    def allowed_cells(self, batch_size: int) -> torch.Tensor:
        """Boolean `(batch_size, N_cells)`: which prototypes each row may read/emit.

        A batch expanded by `generate` (`num_return_sequences`, repeat-interleaved rows) maps back to its source rows.
        """
        return self._cached(("allowed", batch_size), lambda: self._allowed_cells(batch_size))

    def _allowed_cells(self, batch_size: int) -> torch.Tensor:
        self._check_batch_size(batch_size)
        rows = torch.arange(batch_size, device=self.cell_sample_idx.device) // (batch_size // self.batch_size)
        return rows[:, None] == self.cell_sample_idx[None, :]

    def all_cells_allowed(self, batch_size: int) -> bool:
        """True when every row may use every prototype, so no masking is needed: the state has one source row (every
        prototype belongs to it, however often `generate` repeats it) or no prototype."""
        self._check_batch_size(batch_size)
        return self.batch_size == 1 or self.num_cells == 0

    def prototypes_t(self, dtype: torch.dtype) -> torch.Tensor:
        """`(H, N_cells)`: `P^T` in `dtype`, the VRT classifier (a view of `prototypes` when the dtype matches)."""
        return self._cached(("prototypes_t", dtype), lambda: self.prototypes.to(dtype).T)

    def vrt_logit_bias(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor | None:
        """`(batch_size, 1, N_cells)` additive bias of the VRT logits: 0 on each row's own prototypes, `-inf` on the
        others; None when every row may emit every prototype."""
        if self.all_cells_allowed(batch_size):
            return None

        def build() -> torch.Tensor:
            allowed = self.allowed_cells(batch_size)
            bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
            return bias[:, None, :]

        return self._cached(("vrt_logit_bias", batch_size, dtype), build)

    def image_embeds_for(self, batch_size: int) -> torch.Tensor:
        """Raw image embeddings in the order of the `<|image_pad|>` tokens of a batch of `batch_size` rows (the
        state's own batch, or its repeat-interleaved expansion by `generate`), `(N_tokens, H)`."""
        if batch_size == self.batch_size:
            return self.image_embeds
        allowed = self.allowed_cells(batch_size)
        return self.image_embeds[allowed.nonzero(as_tuple=True)[1]]

    def logit_mask(self, vocab_rows: int, batch_size: int | None = None) -> torch.Tensor:
        """Boolean `(B, V + N_cells)`: True on the text vocabulary and on the row's own prototypes (the
        authors' per-image logit mask, here per row)."""
        batch_size = self.batch_size if batch_size is None else batch_size

        def build() -> torch.Tensor:
            allowed = self.allowed_cells(batch_size)
            return torch.cat([allowed.new_ones(batch_size, vocab_rows), allowed], dim=1)

        return self._cached(("logit_mask", vocab_rows, batch_size), build)

    def stacked_step_hidden(self) -> torch.Tensor | None:
        """`(B, T_new, H)`: hidden state that predicted each generated token, or None if nothing was recorded."""
        if not self.step_hidden_states:
            return None
        return torch.cat(self.step_hidden_states, dim=1)


def cells_per_image(image_grid_thw: torch.Tensor, spatial_merge_size: int, cell_size_px: int) -> list[int]:
    """Merged cells (VRTs) per image; `ValueError` for an image smaller than one merged cell.

    Works on the grid as Python ints (one host copy, no tensor ops: this runs on every prefill). The arithmetic is
    `padt.processing.vrt.cells_per_image`, shared with the processor, the collator and the training step.
    """
    from padt.processing.vrt import cells_per_image as _cells_per_image

    return _cells_per_image(image_grid_thw, spatial_merge_size, cell_size_px=cell_size_px)


def assign_images_to_rows(image_tokens_per_row: list[int], cells: list[int]) -> list[int]:
    """Batch row of each image, from the `<|image_pad|>` count of each row (images are in row order).

    Raises `ValueError` when a row's image tokens do not add up to whole images or images are left over.
    """
    owners: list[int] = []
    i = 0
    for row, count in enumerate(image_tokens_per_row):
        remaining = count
        while remaining > 0 and i < len(cells):
            if cells[i] > remaining:
                break
            owners.append(row)
            remaining -= cells[i]
            i += 1
        if remaining != 0:
            raise ValueError(
                f"image-token count mismatch: batch row {row} has {count} <|image_pad|> tokens, which do not match the "
                f"merged-cell counts of the next images {cells[len(owners):len(owners) + 3]} (one token per merged cell)"
            )
    if i != len(cells):
        raise ValueError(
            f"image-token count mismatch: {len(cells)} images were given (image_grid_thw) but the prompts' "
            f"<|image_pad|> tokens cover only {i} of them ({sum(image_tokens_per_row)} tokens, {sum(cells)} cells)"
        )
    return owners
