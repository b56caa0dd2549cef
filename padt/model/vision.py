"""`VisionFeatures`: what one call of a backbone's vision tower gives PaDT, whatever the backbone.

* `image_embeds`: the merged cell features E_img, one row per merged cell (one VRT), raster order per image: exactly
  what the vanilla model inserts at the `<|image_pad|>` positions, and the source of the visual reference prototypes;
* `high_res_embeds`: the pre-merge features, one row per ViT patch, in the order the decoder reads them;
* `pos_embeds`: the vision rotary embedding (cos, sin) of every patch, in the same order.

Only the decoder (`vl_decode`, training) reads the last two, so they are derived on first access and cached: a prefill
that only generates text and VRTs pays nothing for them. How they are derived is the backbone's business
(`padt.model.backbones`); see docs/method.md#the-backbone-seam.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from padt.model.configuration import VRT_FEATURE_ORDERS

RotaryPair = tuple[torch.Tensor, torch.Tensor]


def check_feature_order(order: str) -> None:
    """`ValueError` unless `order` is one of `VRT_FEATURE_ORDERS`."""
    if order not in VRT_FEATURE_ORDERS:
        raise ValueError(f"order={order!r}; expected one of {VRT_FEATURE_ORDERS}")


class VisionFeatures:
    """Per-batch vision features, images concatenated in batch order.

    Attributes:
        image_embeds (`torch.Tensor` of shape `(N_cells, H_llm)`, *optional*): merged cell features, raster order per
            image.
        high_res_embeds (`torch.Tensor` of shape `(N_patches, D_vit)`, *optional*): pre-merge features in the decoder's
            order; derived on first access.
        pos_embeds (`tuple[torch.Tensor, torch.Tensor]`, *optional*): vision rotary (cos, sin), each
            `(N_patches, head_dim_vit)`, float32, same order as `high_res_embeds`; derived on first access.
    """

    def __init__(
        self,
        image_embeds: torch.Tensor | None,
        high_res: torch.Tensor | Callable[[], torch.Tensor] | None,
        pos: RotaryPair | Callable[[], RotaryPair] | None,
    ) -> None:
        """`high_res` and `pos` are the tensors themselves or zero-argument functions that compute them once."""
        self.image_embeds = image_embeds
        self._high_res, self._pos = high_res, pos

    @property
    def high_res_embeds(self) -> torch.Tensor | None:
        if callable(self._high_res):
            self._high_res = self._high_res()
        return self._high_res

    @property
    def pos_embeds(self) -> RotaryPair | None:
        if callable(self._pos):
            self._pos = self._pos()
        return self._pos
