"""PaDT on Qwen2.5-VL (the authors' backbone): `PaDTConfig` and `PaDTForConditionalGeneration`.

Subclasses transformers' `Qwen2_5_VLConfig` and `Qwen2_5_VLForConditionalGeneration` (no patching, no copied
`generate` internals) and implements the backbone hooks (`padt.model.backbones.base`):

* vision: one call of the tower gives the merged cells (`pooler_output`), the pre-merge features (`last_hidden_state`)
  and, recomputed with the tower's own `rotary_pos_emb`, the rotary (cos, sin) of every 14-px patch;
* the LLM gets the merged features through `mm_encoder_outputs`, exactly what vanilla Qwen inserts at `<|image_pad|>`;
* M-RoPE positions for decode calls made by hand, and the prefill's rope deltas in the authors' (4.50) convention.

Feature order (docs/method.md#feature-order). The tower works in *window order* (merge units grouped by attention
window). The authors hand the pre-merge rows and the rotary embedding to their decoder in that order (the released
decoders were trained with it), so `vrt_feature_order="window"` keeps it. `"merge_block"` undoes the window
permutation: patches grouped per merged cell (the cell's `merge**2` sub-patches contiguous), cells in raster order, so
row `c * merge**2 + j` lies in VRT cell `c`, the geometrically consistent choice for models trained from scratch.

Loading: the released checkpoints use transformers-4.50 key names (`model.*`, `visual.*`); the conversion that vanilla
Qwen2.5-VL registers for its class name is registered for ours too (`register_checkpoint_conversion_mapping`, a public
transformers API keyed by our class name, so vanilla classes are unaffected).
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import Qwen2_5_VLConfig
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
)
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from padt.legacy import EmbedTokensAlias
from padt.model.configuration import PADT_CONFIG_FIELDS_DOC, PaDTConfigMixin
from padt.model.modeling import PaDTModelMixin
from padt.model.vision import VisionFeatures, check_feature_order


@strict
class PaDTConfig(PaDTConfigMixin, Qwen2_5_VLConfig):
    __doc__ = "Qwen2.5-VL's config plus PaDT's fields:\n" + PADT_CONFIG_FIELDS_DOC

    model_type = "qwen2_5_vl"

    use_visual_prototype_projection: bool = True
    visual_prototype_rank: int = 64
    vl_decoder: dict | None = None
    vrt_feature_order: str = "window"
    decoder_attn_implementation: str | None = None
    mask_unused_token_rows: bool = False
    num_tokenizer_tokens: int | None = None


class PaDTQwenModel(EmbedTokensAlias, Qwen2_5_VLModel):
    """Qwen2.5-VL's inner model, plus the authors' `model.model.embed_tokens` path (`padt.legacy`)."""


for _ours, _theirs in (("PaDTForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
                       ("PaDTQwenModel", "Qwen2_5_VLModel")):
    if get_checkpoint_conversion_mapping(_ours) is None:
        register_checkpoint_conversion_mapping(_ours, get_checkpoint_conversion_mapping(_theirs) or [])


class PaDTForConditionalGeneration(PaDTModelMixin, Qwen2_5_VLForConditionalGeneration):
    """PaDT on Qwen2.5-VL: loads the released `PaDT-MLLM/*` checkpoints and base Qwen2.5-VL checkpoints as they are."""

    config_class = PaDTConfig
    config: PaDTConfig

    def __init__(self, config: PaDTConfig):
        if not isinstance(config, PaDTConfig):
            config = PaDTConfig.from_dict(config.to_dict())
        # The parent's __init__ builds the same two modules; building them here once (not twice) keeps 7B init cheap.
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = PaDTQwenModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._init_padt_modules(config)
        self.post_init()

    # ------------------------------------------------------------------ vision
    def encode_vision(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionFeatures:
        visual, order = self.model.visual, self.config.vrt_feature_order
        check_feature_order(order)  # before the tower runs
        out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw)
        vit_output, unit = out.last_hidden_state, visual.config.spatial_merge_size**2

        def high_res() -> torch.Tensor:
            if order == "window":
                return vit_output
            return _permute_units(vit_output, torch.argsort(window_index(visual, image_grid_thw)), unit)

        def rotary() -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = rotary_embeddings(visual, image_grid_thw, vit_output.device)
            if order == "merge_block":
                return cos, sin
            index = window_index(visual, image_grid_thw)
            return _permute_units(cos, index, unit), _permute_units(sin, index, unit)

        return VisionFeatures(out.pooler_output, high_res, rotary)

    # ------------------------------------------------------------------ language model
    def run_language_model(
        self,
        *,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        image_embeds: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        mm_token_type_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: Any,
        use_cache: bool | None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        encoded = None
        if image_embeds is not None:  # what vanilla Qwen inserts at the <|image_pad|> positions
            encoded = {"image": BaseModelOutputWithPooling(pooler_output=(image_embeds,))}
        return self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=encoded,
            **kwargs,
        )

    # ------------------------------------------------------------------ M-RoPE positions
    def manual_decode_position_ids(
        self, shape: torch.Size, past_len: int, attention_mask: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor | None:
        """M-RoPE positions `(3, B, L)` of `L` new text tokens after `past_len` cached ones (decode calls made by hand,
        as the authors' API allows; `generate` passes its own): text position (pads not counted) + the prefill's delta.
        """
        if self.model.rope_deltas is None:
            return None
        batch, length = shape
        if attention_mask is not None and attention_mask.ndim == 2:
            text_pos = (attention_mask.long().cumsum(-1) - 1)[:, -length:].to(device)
        else:
            text_pos = torch.arange(past_len, past_len + length, device=device)[None, :].expand(batch, -1)
        return (text_pos + self._rope_deltas_for(batch, device))[None].expand(3, -1, -1)

    def _rope_deltas_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """The prefill's rope deltas `(batch, 1)`, repeat-interleaved when `generate` expanded the batch."""
        deltas = self.model.rope_deltas.to(device)
        return deltas if deltas.shape[0] == batch else deltas.repeat_interleave(batch // deltas.shape[0], dim=0)

    def output_rope_deltas(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Prefill M-RoPE deltas `(B, 1)` in the authors' (transformers-4.50) convention: the next token's position is
        its padded index + delta. transformers 5.x stores them relative to unpadded positions instead."""
        if self.model.rope_deltas is None or attention_mask is None or attention_mask.ndim != 2:
            return self.model.rope_deltas
        deltas = self._rope_deltas_for(attention_mask.shape[0], attention_mask.device)
        pads = attention_mask.shape[1] - attention_mask.long().sum(1, keepdim=True)
        return deltas - pads.to(deltas.device)


# ---------------------------------------------------------------------- tower helpers
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
