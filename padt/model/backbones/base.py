"""The backbone seam: what PaDT needs from a vision-language model, written down once.

PaDT (`padt.model.modeling.PaDTModelMixin`) is backbone-agnostic. A backbone module (`qwen2_5_vl.py`, one per
backbone) subclasses transformers' own model class (no patching, no copied `generate` internals) together with
`PaDTModelMixin`, and implements the hooks below; its config class mixes `PaDTConfigMixin` into the backbone's config,
which derives the geometry (`cell_size_px`, `spatial_merge_size`, `patch_size`, `vrt_base_id`) and must expose
`image_token_id` / `video_token_id`. Everything downstream (prototypes, VRT codec, decoder, parser, data, losses,
trainer, evaluation, predictor, demo) reads only these hooks and those config properties. See
docs/method.md#the-backbone-seam.

What a backbone provides:

* `encode_vision`: merged cell features (the prototype source), pre-merge features in the decoder's order and the
  vision rotary (cos, sin);
* `run_language_model`: the LLM over embeddings, with the merged features at the image-token positions;
* `mm_token_type_ids_from`: 1 at image tokens, 2 at video tokens, else 0 (generated VRT ids count as text);
* `manual_decode_position_ids`: positions of tokens decoded by hand after a prefill (rotary schemes with image
  offsets, e.g. M-RoPE);
* `output_rope_deltas`: the rope deltas reported in the forward output (the authors' convention);
* the config (`PaDTConfigMixin`): cell size in pixels, merge size, patch size, VRT base id, image token ids;
* the processor (`padt.processing`, saved with the checkpoint): the chat template and the image processor.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from padt.model.vision import VisionFeatures


class VisionLanguageBackbone:
    """The hooks a backbone implements for PaDT (see the module docstring); each raises until it is implemented."""

    def encode_vision(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionFeatures:
        """Run the vision tower once.

        Args:
            pixel_values (`torch.Tensor` of shape `(N_patches, C*T*P*P)`): the processor's output.
            image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`): (t, h, w) per image, in patches.
        Returns:
            `VisionFeatures`: `image_embeds (N_cells, H_llm)` in raster order per image, and (lazily)
            `high_res_embeds (N_patches, D_vit)` and `pos_embeds` in the order `config.vrt_feature_order` names.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement encode_vision")

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
        """The LLM over `inputs_embeds (B, L, H)` (text and VRT rows already embedded), with `image_embeds
        (N_image_tokens, H)` placed at the image-token positions (None on decode steps). Returns the final-norm
        `last_hidden_state (B, L, H)`, the cache, and the optional per-layer states / attentions."""
        raise NotImplementedError(f"{type(self).__name__} does not implement run_language_model")

    def mm_token_type_ids_from(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`(B, L)` int: 1 at image tokens, 2 at video tokens, else 0 (what the processor returns)."""
        types = (input_ids == self.config.image_token_id).int()
        return types + 2 * (input_ids == self.config.video_token_id).int()

    def manual_decode_position_ids(
        self, shape: torch.Size, past_len: int, attention_mask: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor | None:
        """Position ids of `shape = (B, L)` new tokens after `past_len` cached ones, for decode calls made by hand
        (`generate` passes its own); None lets the language model derive them."""
        return None

    def output_rope_deltas(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The prefill's rope deltas as the forward output reports them (`rope_deltas`), or None."""
        return None
