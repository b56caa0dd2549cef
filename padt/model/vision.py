"""Vision features for PaDT from transformers' own Qwen2.5-VL vision tower, without patching it.

One call of the vision tower gives everything PaDT needs (spec 3.2):

* low-res merged embeddings E_img: the merger output, one row per merged cell, raster order per image
  (`pooler_output`, exactly what vanilla Qwen inserts at the `<|image_pad|>` positions);
* high-res embeddings: the last ViT block's output before the merger (`last_hidden_state`), one row per 14-px patch;
* the ViT rotary embedding (cos, sin) of every patch, recomputed with the tower's own `rotary_pos_emb`.

Only the decoder (`vl_decode`) needs the last two in its row order, so `VisionFeatures` derives them on first access.

Orderings. The tower works in *window order* (merge units grouped by attention window). The authors hand the high-res rows
and the rotary embedding to their decoder in that order (the released decoders were trained with it), so `order="window"`
keeps it. `order="merge_block"` undoes the window permutation: patches grouped per merged cell (the cell's
`merge**2` sub-patches contiguous), cells in raster order, so row `c*merge**2 + j` lies in VRT cell `c` - the geometrically
consistent choice for models trained from scratch (the decoder then places masks with the matching layout).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from padt.model.configuration import VRT_FEATURE_ORDERS


def _check_order(order: str) -> None:
    if order not in VRT_FEATURE_ORDERS:
        raise ValueError(f"order={order!r}; expected one of {VRT_FEATURE_ORDERS}")


class VisionFeatures:
    """Per-batch vision features, images concatenated in batch order.

    `image_embeds` comes with the tower call. The two decoder-only inputs need the window index and a recomputation of
    the ViT rotary embedding, which generation never uses, so they are derived on first access and cached (`vl_decode`
    and training read them; a prefill that only generates text and VRTs pays nothing for them).

    Attributes:
        image_embeds (`torch.Tensor` of shape `(N_cells, H_llm)`, *optional*): merger output, raster order per image.
        high_res_embeds (`torch.Tensor` of shape `(N_patches, D_vit)`, *optional*): pre-merger ViT output (see the
            module doc for the order); derived on first access.
        pos_embeds (`tuple[torch.Tensor, torch.Tensor]`, *optional*): rotary (cos, sin), each
            `(N_patches, head_dim_vit)`, float32, same order as `high_res_embeds`; derived on first access.
    """

    def __init__(
        self,
        image_embeds: torch.Tensor,
        vit_output: torch.Tensor,
        visual: nn.Module,
        grid_thw: torch.Tensor,
        order: str = "window",
    ) -> None:
        """From one tower call: `image_embeds` = its `pooler_output`, `vit_output` = its `last_hidden_state` (window
        order), `visual` the tower itself and `grid_thw` `(num_images, 3)` its image grid."""
        _check_order(order)
        self.image_embeds = image_embeds
        self._vit_output, self._visual, self._grid_thw, self._order = vit_output, visual, grid_thw, order

    @classmethod
    def from_tensors(
        cls,
        high_res_embeds: torch.Tensor | None,
        pos_embeds: tuple[torch.Tensor, torch.Tensor] | None,
        image_embeds: torch.Tensor | None = None,
    ) -> VisionFeatures:
        """Features given as tensors (e.g. the authors' `past_high_res_image_embeds`, `past_visual_pe`): nothing is
        derived."""
        feats = cls.__new__(cls)
        feats.image_embeds = image_embeds
        feats.high_res_embeds, feats.pos_embeds = high_res_embeds, pos_embeds  # fills the cached properties
        return feats

    @cached_property
    def high_res_embeds(self) -> torch.Tensor | None:
        if self._order == "window":
            return self._vit_output
        index = window_index(self._visual, self._grid_thw)
        return _permute_units(self._vit_output, torch.argsort(index), self._visual.config.spatial_merge_size**2)

    @cached_property
    def pos_embeds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        cos, sin = rotary_embeddings(self._visual, self._grid_thw, self._vit_output.device)
        if self._order == "merge_block":
            return cos, sin
        index = window_index(self._visual, self._grid_thw)
        unit = self._visual.config.spatial_merge_size**2
        return _permute_units(cos, index, unit), _permute_units(sin, index, unit)


def window_index(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """Window permutation of merge units, `(N_cells,)` long, as the tower applies it (`x_window = x[index]`)."""
    cfg = visual.config
    index, _ = get_vision_window_index(
        grid_thw, spatial_merge_size=cfg.spatial_merge_size, window_size=cfg.window_size, patch_size=cfg.patch_size
    )
    return index.to(grid_thw.device)


def rotary_embeddings(visual: nn.Module, grid_thw: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT rotary (cos, sin) per patch in merge-block order, each `(N_patches, head_dim_vit)` float32."""
    position_ids = get_vision_position_ids(grid_thw, visual.config.spatial_merge_size).to(device)
    probe = torch.empty(0, device=device)
    cos, sin = visual.rotary_pos_emb(probe, position_ids)
    return cos.float(), sin.float()


def _permute_units(x: torch.Tensor, index: torch.Tensor, unit: int) -> torch.Tensor:
    """Reorder groups of `unit` consecutive rows: `(N, C)` -> `(N, C)` with group g taken from group `index[g]`."""
    return x.reshape(-1, unit, x.shape[-1])[index].reshape(x.shape)


def encode_images(
    visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor, order: str = "window"
) -> VisionFeatures:
    """Run the Qwen2.5-VL vision tower once and return PaDT's three feature sets (the decoder's two lazily).

    Args:
        visual: `Qwen2_5_VisionTransformerPretrainedModel` (`model.model.visual`).
        pixel_values (`torch.Tensor` of shape `(N_patches, C*T*P*P)`): processor output.
        grid_thw (`torch.LongTensor` of shape `(num_images, 3)`): (t, h, w) per image in patches.
        order: `"window"` (authors', checkpoint-compatible) or `"merge_block"` (consistent), see the module doc.
    """
    _check_order(order)  # before the tower runs
    out = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw)
    return VisionFeatures(out.pooler_output, out.last_hidden_state, visual, grid_thw, order)
