"""`PaDTForConditionalGeneration`: transformers' Qwen2.5-VL with PaDT's Visual Reference Tokens and decoder.

Subclasses `Qwen2_5_VLForConditionalGeneration` (no patching, no copied `generate` internals). What it adds:

* `vis_norm`/`vis_proj`: visual prototypes from the merged image embeddings (spec 3.3);
* VRT ids `>= V` embedded by prototype rows and scored by `h @ P^T`, masked per batch row (spec 3.4-3.6);
* `vl_decoder` + `vl_decode(...)`: boxes, masks and scores from the hidden states of an object's VRTs (spec 5);
* `generate` that encodes the images once, keeps the image state through the KV cache, returns it under the authors'
  attribute names and records the last-layer feature of every generated token.

Loading: the released checkpoints use transformers-4.50 key names (`model.*`, `visual.*`); the conversion that vanilla
Qwen2.5-VL registers for its class name is registered for ours too (`register_checkpoint_conversion_mapping`, a public
transformers API keyed by our class name, so vanilla classes are unaffected).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
)

from padt.model.configuration import PaDTConfig
from padt.model.decoder.decoder import PaDTDecoder
from padt.model.prototypes import (
    VisualPrototypeProjection,
    ZeroInitLayerNorm,
    build_vis_proj,
    embed_with_prototypes,
    extended_logits,
)
from padt.model.image_state import VRTImageState, assign_images_to_rows, cells_per_image
from padt.model.outputs import PaDTCausalLMOutput, PaDTGenerateOutput
from padt.model.vision import encode_images
from padt.model.decoder.vl_decode import vl_decode as _vl_decode

PADT_MODULE_NAMES = ("vis_norm", "vis_proj", "vl_decoder")
PADT_STATE_KWARGS = ("past_image_embeds", "past_logit_mask", "past_high_res_image_embeds", "past_visual_pe")
# `forward(..., is_main=False)` (the authors' trainer calls the decoder through forward for ZeRO-3 hooks): the first
# five positional arguments are vl_decode's, in this order.
_DECODE_ARG_NAMES = ("object_vp_feats", "low_res_image_embeds", "high_res_image_embeds", "image_grid_thws", "visual_pes")
_FORWARD_POSITIONALS = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds")


class PaDTQwenModel(Qwen2_5_VLModel):
    """Qwen2.5-VL's inner model, plus the transformers-4.50 path `model.model.embed_tokens` that the authors'
    quick-start uses (`processor.prepare(model.model.embed_tokens.weight.shape[0])`)."""

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.embed_tokens


for _ours, _theirs in (("PaDTForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
                       ("PaDTQwenModel", "Qwen2_5_VLModel")):
    if get_checkpoint_conversion_mapping(_ours) is None:
        register_checkpoint_conversion_mapping(_ours, get_checkpoint_conversion_mapping(_theirs) or [])


class PaDTForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    config_class = PaDTConfig
    config: PaDTConfig

    def __init__(self, config: PaDTConfig):
        if not isinstance(config, PaDTConfig):
            config = PaDTConfig.from_dict(config.to_dict())
        # The parent's __init__ builds the same two modules; building them here once (not twice) keeps 7B init cheap.
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        text = config.text_config
        self.model = PaDTQwenModel(config)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if config.use_visual_prototype_projection:
            self.vis_norm = ZeroInitLayerNorm(text.hidden_size)
            self.vis_proj = build_vis_proj(text.hidden_size, config.visual_prototype_rank)
        else:
            self.vis_norm = self.vis_proj = None
        dec = config.vl_decoder
        self.vl_decoder = PaDTDecoder(
            hidden_size=dec["hidden_size"],
            intermediate_size=dec["intermediate_size"],
            llm_hidden_size=dec["llm_hidden_state"],
            num_heads=dec["num_heads"],
            spatial_merge_size=dec["spatial_merge_size"],
            use_mask_head=bool(dec.get("use_mask_loss", True)),
            attn_implementation=config.resolved_decoder_attn_implementation(),
            feature_order=config.vrt_feature_order,
        )
        self.post_init()

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, *args: Any, allow_missing_padt_weights: bool | None = None, **kwargs: Any
    ) -> PaDTForConditionalGeneration:
        """transformers' `from_pretrained`, plus a check of the PaDT weights.

        A base Qwen2.5-VL checkpoint (no `vl_decoder` in its config.json) starts PaDT training: the new modules are
        initialised (`vis_norm` = 0, N(0, 0.02) linears). A PaDT checkpoint (its config has `vl_decoder`) that lacks
        any PaDT weight raises `ValueError` naming them, unless `allow_missing_padt_weights=True`.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info["missing_keys"] if k.split(".")[0] in PADT_MODULE_NAMES)
        if missing and allow_missing_padt_weights is None:
            raw, _ = PaDTConfig.get_config_dict(pretrained_model_name_or_path, **{
                k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only", "token", "subfolder") if k in kwargs
            })
            allow_missing_padt_weights = "vl_decoder" not in raw
        if missing and not allow_missing_padt_weights:
            raise ValueError(
                f"{pretrained_model_name_or_path} is a PaDT checkpoint (its config has vl_decoder) but lacks "
                f"{len(missing)} PaDT weights: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}. "
                "Pass allow_missing_padt_weights=True to initialise them instead."
            )
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ZeroInitLayerNorm):  # prototypes start at exactly 0 (spec 3.3)
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)

    # ------------------------------------------------------------------ image state
    def encode_image_state(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        input_ids: torch.Tensor | None = None,
    ) -> VRTImageState:
        """Run the vision tower once and build the batch's prototypes and row assignment.

        Args:
            pixel_values (`torch.Tensor` of shape `(N_patches, C*T*P*P)`).
            image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`).
            input_ids (`torch.LongTensor` of shape `(B, L)`, *optional*): assigns images to rows by their
                `<|image_pad|>` counts (so a row may hold several images or none); without it image i is row i.
        """
        cfg = self.config
        cells = cells_per_image(image_grid_thw, cfg.spatial_merge_size, cfg.cell_size_px)
        if input_ids is not None:
            per_row = (input_ids == cfg.image_token_id).sum(1).tolist()
            owners = assign_images_to_rows(per_row, cells)
            batch_size = input_ids.shape[0]
        else:
            owners, batch_size = list(range(len(cells))), len(cells)
        feats = encode_images(self.model.visual, pixel_values, image_grid_thw, order=cfg.vrt_feature_order)
        prototypes = VisualPrototypeProjection.apply(feats.image_embeds, self.vis_norm, self.vis_proj)
        device = feats.image_embeds.device
        cell_owners = [row for row, n in zip(owners, cells) for _ in range(n)]
        return VRTImageState(
            image_embeds=feats.image_embeds,
            prototypes=prototypes,
            vision=feats,
            image_grid_thw=image_grid_thw,
            image_sample_idx=torch.as_tensor(owners, dtype=torch.long, device=device),
            cell_sample_idx=torch.as_tensor(cell_owners, dtype=torch.long, device=device),
            batch_size=batch_size,
        )

    @staticmethod
    def _sampled_by_generate(input_ids: torch.Tensor, state: VRTImageState | None) -> bool:
        """True for a `generate` step after the first that feeds back one token per row: the token generate sampled
        from this model's last logits, which are `-inf` outside the row's own prototypes, so its VRT ids are valid by
        construction and need no check (a logits processor that forces a VRT id would bypass it)."""
        return state is not None and state.generating and bool(state.step_hidden_states) and input_ids.shape[1] == 1

    def _check_vrt_ids(self, input_ids: torch.Tensor, is_vrt: torch.Tensor, state: VRTImageState | None) -> None:
        """`ValueError` for a VRT id (`is_vrt` marks them) that is not a prototype of its own row's images."""
        V = self.config.vrt_base_id
        rows, cols = is_vrt.nonzero(as_tuple=True)
        cell = input_ids[rows, cols] - V
        n = 0 if state is None else state.num_cells
        if state is None or bool((cell >= n).any()):
            bad = int(cell[cell >= n][0]) if state is not None else int(cell[0])
            raise ValueError(
                f"VRT id {V + bad} (<|VRT_{bad}|> global) is outside the batch's {n} image prototypes; convert VRT ids "
                "to global ids for this batch's images (VisonTextProcessingClass.assign_to_global_vrt_id) and pass "
                "the images (pixel_values) or the image state"
            )
        ok = state.allowed_cells(input_ids.shape[0])[rows, cell]
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0, 0])
            raise ValueError(
                f"VRT id {int(input_ids[rows[i], cols[i]])} in batch row {int(rows[i])} points at prototype {int(cell[i])} "
                f"of an image of row {int(state.cell_sample_idx[cell[i]])}; a sample may only refer to its own images"
            )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        padt_state: VRTImageState | None = None,
        past_image_embeds: torch.Tensor | None = None,
        past_logit_mask: torch.Tensor | None = None,
        past_high_res_image_embeds: torch.Tensor | None = None,
        past_visual_pe: tuple[torch.Tensor, torch.Tensor] | None = None,
        is_main: bool = True,
        **kwargs: Any,
    ) -> PaDTCausalLMOutput | dict:
        r"""PaDT forward. Same inputs as Qwen2.5-VL plus the image state of earlier calls.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): text ids and *global* VRT ids (`V + j`).
            pixel_values, image_grid_thw: the images of the batch (prefill / training). Images belong to rows in order,
                by their `<|image_pad|>` counts.
            mm_token_type_ids (`(B, L)`, *optional*): derived from `input_ids` when absent (authors' callers omit it).
            padt_state (`VRTImageState`, *optional*): image state of an earlier call (decode steps), or
            past_image_embeds, past_logit_mask, past_high_res_image_embeds, past_visual_pe: the same, authors' form.
            labels (`(B, L)`, *optional*): next-token targets (text or global VRT ids, -100 ignored); fp32 loss.
            is_main: `False` runs `vl_decode` instead (authors' trainer API): the first five positional arguments are
                then `object_vp_feats, low_res_image_embeds, high_res_image_embeds, image_grid_thws, visual_pes`.
        Returns:
            `PaDTCausalLMOutput` (see its docstring), or `vl_decode`'s dict when `is_main=False`.
        """
        if not is_main:
            given = dict(zip(_DECODE_ARG_NAMES, (input_ids, attention_mask, position_ids, past_key_values, inputs_embeds)))
            given = {k: v for k, v in given.items() if v is not None}
            given.update({k: kwargs.pop(k) for k in _DECODE_ARG_NAMES if k in kwargs})
            return self.vl_decode(**given, **kwargs)
        if pixel_values_videos is not None:
            raise ValueError("PaDT supports images only: VRTs point at image cells; pass videos as frames of images")

        cfg = self.config
        V = cfg.vrt_base_id
        state = padt_state
        if state is None and past_image_embeds is not None:
            batch = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
            state = VRTImageState.from_legacy(
                past_image_embeds, past_logit_mask, past_high_res_image_embeds, past_visual_pe, V, batch
            )
        if pixel_values is not None and (state is None or state.image_embeds is None):
            if image_grid_thw is None:
                raise ValueError("pixel_values were given without image_grid_thw")
            state = self.encode_image_state(pixel_values, image_grid_thw, input_ids)

        embed = self.get_input_embeddings()
        mm_encoder_outputs = None
        past_len = 0 if past_key_values is None else past_key_values.get_seq_length()
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            # one reduction and one host sync tell whether any id is a VRT (the common decode step has none)
            is_vrt = input_ids >= V if input_ids.numel() and int(input_ids.max()) >= V else None
            if is_vrt is not None and not self._sampled_by_generate(input_ids, state):
                self._check_vrt_ids(input_ids, is_vrt, state)
            inputs_embeds = embed_with_prototypes(
                input_ids, embed, None if is_vrt is None else state.prototypes, V, is_vrt=is_vrt
            )
            # image tokens come with the prompt; decode steps that reuse an image state skip the count
            decoding = state is not None and past_len > 0
            n_image_tokens = 0 if decoding else int(torch.count_nonzero(input_ids == cfg.image_token_id))
            if n_image_tokens:
                if state is None or state.image_embeds is None:
                    raise ValueError(
                        f"input_ids contain {n_image_tokens} <|image_pad|> tokens but no pixel_values were given"
                    )
                image_embeds = state.image_embeds_for(input_ids.shape[0])
                if n_image_tokens != image_embeds.shape[0]:
                    raise ValueError(
                        f"image-token count mismatch: {n_image_tokens} <|image_pad|> tokens for "
                        f"{image_embeds.shape[0]} merged image features"
                    )
                mm_encoder_outputs = {"image": BaseModelOutputWithPooling(pooler_output=(image_embeds,))}
            if mm_token_type_ids is None:
                mm_token_type_ids = self.mm_token_type_ids_from(input_ids)
        elif state is not None and state.image_embeds is not None and pixel_values is not None:
            raise ValueError("with inputs_embeds, insert the image features yourself and pass no pixel_values")

        if position_ids is None and past_len > 0 and self.model.rope_deltas is not None:
            position_ids = self.decode_position_ids(inputs_embeds.shape[:2], past_len, attention_mask, inputs_embeds.device)

        outputs = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            image_grid_thw=image_grid_thw if mm_encoder_outputs is not None else None,
            mm_token_type_ids=mm_token_type_ids,
            second_per_grid_ts=second_per_grid_ts,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        kept = slice_logits_to_keep(hidden, logits_to_keep)
        if state is not None and state.generating:
            # generate keeps the last position only (logits_to_keep=1): record that view, no extra op
            last_only = isinstance(logits_to_keep, int) and kept.shape[1] == 1
            state.step_hidden_states.append(kept if last_only else hidden[:, -1:])

        batch = hidden.shape[0]
        with_vrt = state is not None and state.num_cells > 0
        logits = extended_logits(
            kept,
            self.lm_head,
            state.prototypes_t(hidden.dtype) if with_vrt else None,
            state.vrt_logit_bias(batch, hidden.dtype) if with_vrt else None,
            slice(cfg.num_tokenizer_tokens, V) if cfg.mask_unused_token_rows else None,
        )
        loss = self.next_token_loss(logits, labels) if labels is not None else None
        # generate passes the state itself and returns these once at the end; the per-step outputs leave them unset
        derived = state is not None and not state.generating
        return PaDTCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=self.legacy_rope_deltas(attention_mask) if past_len == 0 else None,
            last_hidden_state=hidden,
            past_image_embeds=None if state is None else state.prototypes,
            past_logit_mask=state.logit_mask(V, batch) if derived else None,
            past_high_res_image_embeds=state.high_res_embeds if derived else None,
            past_visual_pe=state.pos_embeds if derived else None,
            padt_state=state,
        )

    # the authors' name for the LLM path
    def forward_main(self, *args: Any, **kwargs: Any) -> PaDTCausalLMOutput:
        return self.forward(*args, is_main=True, **kwargs)

    def mm_token_type_ids_from(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`(B, L)` int: 1 at image tokens, 2 at video tokens, else 0 (what the processor returns)."""
        types = (input_ids == self.config.image_token_id).int()
        return types + 2 * (input_ids == self.config.video_token_id).int()

    def decode_position_ids(
        self, shape: torch.Size, past_len: int, attention_mask: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """M-RoPE positions `(3, B, L)` of `L` new text tokens after `past_len` cached ones (decode calls made by hand,
        as the authors' API allows; `generate` passes its own): text position (pads not counted) + the prefill's delta.
        """
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

    def legacy_rope_deltas(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Prefill M-RoPE deltas `(B, 1)` in the authors' (transformers-4.50) convention: the next token's position is
        its padded index + delta. transformers 5.x stores them relative to unpadded positions instead."""
        if self.model.rope_deltas is None or attention_mask is None or attention_mask.ndim != 2:
            return self.model.rope_deltas
        deltas = self._rope_deltas_for(attention_mask.shape[0], attention_mask.device)
        pads = attention_mask.shape[1] - attention_mask.long().sum(1, keepdim=True)
        return deltas - pads.to(deltas.device)

    @staticmethod
    def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of `logits[:, t]` against `labels[:, t+1]`, fp32, only at labelled positions."""
        targets = labels[:, 1:]
        keep = targets != -100
        return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep])

    # ------------------------------------------------------------------ decoder
    def vl_decode(
        self,
        object_vp_feats: list[list[torch.Tensor]],
        low_res_image_embeds: torch.Tensor,
        high_res_image_embeds: torch.Tensor,
        image_grid_thws: torch.Tensor,
        visual_pes: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Any,
    ) -> dict:
        """Boxes, scores and masks per object (authors' API; spec 3.9).

        Args:
            object_vp_feats: per sample, per object, `(n_vrt, H)` features (hidden states that emitted the VRTs).
            low_res_image_embeds (`(N_cells, H)`): prototypes (`past_image_embeds`).
            high_res_image_embeds (`(N_patches, D_vit)`), image_grid_thws (`(num_images, 3)`), visual_pes ((cos, sin)).
        Returns:
            dict with `pred_boxes (N, 4)` cxcywh in [0, 1], `pred_score (N, 1)` logits, `pred_mask (N, 4Hmax, 4Wmax)`
            logits, `pred_mask_valid_hw` (Hs, Ws), `sample_idx` (list).
        """
        return _vl_decode(
            self.vl_decoder,
            object_vp_feats,
            low_res_image_embeds,
            high_res_image_embeds,
            image_grid_thws,
            visual_pes,
            spatial_merge_size=self.config.spatial_merge_size,
            **kwargs,
        )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> PaDTGenerateOutput | torch.Tensor:
        """`GenerationMixin.generate` with PaDT's image state.

        The images are encoded once here; the state (prototypes, per-row logit mask, high-res features, rotary
        embeddings) is passed to every step through `model_kwargs` and the KV cache, and returned (authors' attribute
        names) when `return_dict_in_generate=True`, together with `vrt_hidden_states` (B, T_new, H), the final-norm
        state that predicted each generated token. Generated VRT ids are global (`V + j`).
        """
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        pixel_values = kwargs.pop("pixel_values", None)
        state = kwargs.pop("padt_state", None)
        legacy = {k: kwargs.pop(k) for k in PADT_STATE_KWARGS if k in kwargs}
        if state is None and pixel_values is not None:
            if kwargs.get("image_grid_thw") is None:
                raise ValueError("pixel_values were given without image_grid_thw")
            state = self.encode_image_state(pixel_values, kwargs["image_grid_thw"], input_ids)
        elif state is None and legacy.get("past_image_embeds") is not None:
            state = VRTImageState.from_legacy(
                legacy["past_image_embeds"], legacy.get("past_logit_mask"), legacy.get("past_high_res_image_embeds"),
                legacy.get("past_visual_pe"), self.config.vrt_base_id, input_ids.shape[0],
            )
        if input_ids is not None and kwargs.get("mm_token_type_ids") is None:
            kwargs["mm_token_type_ids"] = self.mm_token_type_ids_from(input_ids)
        if state is not None:
            state.generating, state.step_hidden_states = True, []
        try:
            out = super().generate(inputs, *args, padt_state=state, **kwargs)
        finally:
            if state is not None:
                state.generating = False
        if not isinstance(out, GenerateDecoderOnlyOutput):
            return out
        V = self.config.vrt_base_id
        return PaDTGenerateOutput(
            **{k: v for k, v in out.items()},
            past_image_embeds=None if state is None else state.prototypes,
            past_logit_mask=None if state is None else state.logit_mask(V, out.sequences.shape[0]),
            past_high_res_image_embeds=None if state is None else state.high_res_embeds,
            past_visual_pe=None if state is None else state.pos_embeds,
            vrt_hidden_states=None if state is None else state.stacked_step_hidden(),
            padt_state=state,
        )

