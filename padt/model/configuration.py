"""PaDT's configuration fields and everything derived from them, for any backbone (`PaDTConfigMixin`).

A PaDT config is the backbone's own config class plus PaDT's fields (each backbone module declares the concrete class,
e.g. `padt.model.backbones.qwen2_5_vl.PaDTConfig`). The released checkpoints (`PaDT-MLLM/PaDT_*`) keep
`model_type: qwen2_5_vl` and the flat transformers-4.50 layout, with two extra keys: `use_visual_prototype_projection`
(bool) and `vl_decoder` (a dict; docs/method.md#checkpoint-format). We keep `model_type` unchanged so that our saved
checkpoints stay loadable by the authors' code and by the vanilla backbone.

Every geometric constant is derived here from the vision config (merge size, patch size, decoder width) and the text
config (VRT base id = the number of embedding rows); nothing else in the library hard-codes them.
"""

from __future__ import annotations

from typing import Any

from padt.model.decoder.attention import ATTN_IMPLEMENTATIONS as DECODER_ATTN_IMPLEMENTATIONS
from padt.model.decoder.decoder import FEATURE_ORDERS as VRT_FEATURE_ORDERS

PADT_CONFIG_FIELDS_DOC = r"""
    use_visual_prototype_projection (`bool`, defaults to `True`):
        Prototypes are `LN(E) + W2 W1 LN(E)` (True) or a copy of the merged image embeddings E (False; paper ablation).
    visual_prototype_rank (`int`, defaults to 64):
        Rank r of the prototype projection `W2 W1` (the authors hard-code 64).
    vl_decoder (`dict`, *optional*):
        The authors' decoder dict (`hidden_size`, `intermediate_size`, `llm_hidden_state`, `num_heads`,
        `spatial_merge_size`, `use_mask_loss`, `name`, `attn_implementation`). Missing keys are filled from the vision
        and text configs. `hidden_size`/`num_heads` must equal the vision tower's: the decoder adds ViT features without
        projection and applies the ViT rotary embedding in its heads.
    vrt_feature_order (`str`, defaults to `"window"`):
        Order of the pre-merger (high-res) features and rotary embeddings handed to the decoder. `"window"` reproduces
        the authors' (the released decoders were trained with it; docs/method.md#feature-order); `"merge_block"`
        (rows grouped per VRT cell, cells in raster order) is the geometrically consistent order for models trained
        from scratch.
    decoder_attn_implementation (`str`, *optional*):
        Attention backend of the decoder (`sdpa`, `eager`, `flash_attention_2`). `None` follows the LLM's
        `attn_implementation` (sdpa when that is something else). The legacy `vl_decoder["attn_implementation"]` is kept
        in the dict for the authors' code but not used: it always says `flash_attention_2`.
    mask_unused_token_rows (`bool`, defaults to `False`):
        Also mask the logits of embedding rows that no tokenizer entry uses (e.g. Qwen's 271 `<|empty_token_*|>` rows,
        docs/method.md#vrt-ids-and-the-extended-vocabulary). Off by default to compute exactly the authors'
        function; needs `num_tokenizer_tokens`.
    num_tokenizer_tokens (`int`, *optional*):
        Number of real tokenizer entries (ids below it are valid text tokens); used by `mask_unused_token_rows`.
    """


class PaDTConfigMixin:
    """PaDT's derived constants, decoder dict and validation; mixed into a backbone's config class.

    The concrete class (a `@strict` dataclass, as transformers' configs are) declares PaDT's fields, documented in
    `PADT_CONFIG_FIELDS_DOC`, with their defaults: `use_visual_prototype_projection: bool = True`,
    `visual_prototype_rank: int = 64`, `vl_decoder: dict | None = None`, `vrt_feature_order: str = "window"`,
    `decoder_attn_implementation: str | None = None`, `mask_unused_token_rows: bool = False`,
    `num_tokenizer_tokens: int | None = None`.
    """

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.vl_decoder = self._complete_decoder_dict(dict(self.vl_decoder or {}))
        self.validate_padt()

    # ------------------------------------------------------------------ derived constants (one source of truth)
    @property
    def vrt_base_id(self) -> int:
        """Id of `<|VRT_0|>`: the number of rows of the text embedding table (V)."""
        return int(self.text_config.vocab_size)

    @property
    def spatial_merge_size(self) -> int:
        return int(self.vision_config.spatial_merge_size)

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def cell_size_px(self) -> int:
        """Side of one merged cell (one VRT) in input pixels: patch_size * spatial_merge_size (28 for Qwen2.5-VL)."""
        return self.patch_size * self.spatial_merge_size

    # ------------------------------------------------------------------ decoder dict
    def _complete_decoder_dict(self, dec: dict) -> dict:
        vis, txt = self.vision_config, self.text_config
        dec.setdefault("name", "PaDTDecoder")
        dec.setdefault("attn_implementation", "flash_attention_2")  # what the authors' code writes; informational
        dec.setdefault("hidden_size", vis.hidden_size)
        dec.setdefault("intermediate_size", vis.intermediate_size)
        dec.setdefault("num_heads", vis.num_heads)
        dec.setdefault("use_mask_loss", True)
        # The authors' __init__ overwrites these two from the base configs; so do we.
        dec["llm_hidden_state"] = txt.hidden_size
        dec["spatial_merge_size"] = vis.spatial_merge_size
        return dec

    def validate_padt(self) -> None:
        """Raise `ValueError` naming the field when the PaDT fields cannot work with this base model."""
        vis, dec = self.vision_config, self.vl_decoder
        if dec["hidden_size"] != vis.hidden_size:
            raise ValueError(
                f"vl_decoder.hidden_size={dec['hidden_size']} must equal vision_config.hidden_size={vis.hidden_size}: the "
                "decoder adds the ViT's pre-merger features to its memory without a projection."
            )
        if dec["num_heads"] != vis.num_heads:
            raise ValueError(
                f"vl_decoder.num_heads={dec['num_heads']} must equal vision_config.num_heads={vis.num_heads}: the decoder "
                "applies the ViT rotary embedding (width = vision head_dim) inside its heads."
            )
        if self.vrt_feature_order not in VRT_FEATURE_ORDERS:
            raise ValueError(f"vrt_feature_order={self.vrt_feature_order!r}; expected one of {VRT_FEATURE_ORDERS}")
        if self.decoder_attn_implementation not in (None, *DECODER_ATTN_IMPLEMENTATIONS):
            raise ValueError(
                f"decoder_attn_implementation={self.decoder_attn_implementation!r}; expected None or one of "
                f"{DECODER_ATTN_IMPLEMENTATIONS}"
            )
        if self.visual_prototype_rank < 1:
            raise ValueError(f"visual_prototype_rank must be >= 1, got {self.visual_prototype_rank}")
        if self.mask_unused_token_rows and not self.num_tokenizer_tokens:
            raise ValueError("mask_unused_token_rows=True needs num_tokenizer_tokens (the tokenizer's length)")

    def resolved_decoder_attn_implementation(self) -> str:
        """The decoder backend: explicit setting, else the LLM's when the decoder has it, else sdpa."""
        if self.decoder_attn_implementation is not None:
            return self.decoder_attn_implementation
        llm = getattr(self, "_attn_implementation", None)
        return llm if llm in DECODER_ATTN_IMPLEMENTATIONS else "sdpa"
