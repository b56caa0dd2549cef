"""Vision features for PaDT from transformers' own Qwen2.5-VL vision tower, without patching it.

One call of the vision tower gives everything PaDT needs (spec 3.2):

* low-res merged embeddings E_img: the merger output, one row per merged cell, raster order per image
  (`pooler_output`, exactly what vanilla Qwen inserts at the `<|image_pad|>` positions);
* high-res embeddings: the last ViT block's output before the merger (`last_hidden_state`), one row per 14-px patch;
* the ViT rotary embedding (cos, sin) of every patch, recomputed with the tower's own `rotary_pos_emb`.

Orderings. The tower works in *window order* (merge units grouped by attention window). The authors hand the high-res rows
and the rotary embedding to their decoder in that order (the released decoders were trained with it), so `order="window"`
keeps it. `order="merge_block"` undoes the window permutation: patches grouped per merged cell (the cell's
`merge**2` sub-patches contiguous), cells in raster order, so row `c*merge**2 + j` lies in VRT cell `c` - the geometrically
consistent choice for models trained from scratch (the decoder then places masks with the matching layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index


@dataclass
class VisionFeatures:
    """Per-batch vision features, images concatenated in batch order.

    Attributes:
        image_embeds (`torch.Tensor` of shape `(N_cells, H_llm)`): merger output, raster order per image.
        high_res_embeds (`torch.Tensor` of shape `(N_patches, D_vit)`): pre-merger ViT output (see module doc for order).
        pos_embeds (`tuple[torch.Tensor, torch.Tensor]`): rotary (cos, sin), each `(N_patches, head_dim_vit)`, float32,
            same order as `high_res_embeds`.
    """

    image_embeds: torch.Tensor
    high_res_embeds: torch.Tensor
    pos_embeds: tuple[torch.Tensor, torch.Tensor]


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
    """Run the Qwen2.5-VL vision tower once and return PaDT's three feature sets.

    Args:
        visual: `Qwen2_5_VisionTransformerPretrainedModel` (`model.model.visual`).
        pixel_values (`torch.Tensor` of shape `(N_patches, C*T*P*P)`): processor output.
        grid_thw (`torch.LongTensor` of shape `(num_images, 3)`): (t, h, w) per image in patches.
        order: `"window"` (authors', checkpoint-compatible) or `"merge_block"` (consistent), see the module doc.
    """
    out = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw)
    unit = visual.config.spatial_merge_size**2
    index = window_index(visual, grid_thw)
    cos, sin = rotary_embeddings(visual, grid_thw, pixel_values.device)
    high = out.last_hidden_state
    if order == "window":
        cos, sin = _permute_units(cos, index, unit), _permute_units(sin, index, unit)
    elif order == "merge_block":
        high = _permute_units(high, torch.argsort(index), unit)
    else:
        raise ValueError(f"order={order!r}; expected 'window' or 'merge_block'")
    return VisionFeatures(image_embeds=out.pooler_output, high_res_embeds=high, pos_embeds=(cos, sin))
