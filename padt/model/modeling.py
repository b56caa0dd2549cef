"""`PaDTModelMixin`: PaDT on top of any vision-language backbone, read as the method describes it.

`forward` reads: image state (vision tower once -> prototypes, docs/method.md#visual-reference-prototypes) -> input
embeddings (text rows + prototype rows for VRT ids) -> the backbone's LLM -> text logits + prototype logits, masked per
batch row (docs/method.md#vrt-ids-and-the-extended-vocabulary) -> next-token loss. `generate` encodes the images once
and carries the image state through the KV cache (docs/method.md#generation-and-the-image-state); `vl_decode` turns an
object's VRT hidden states into a box, score and mask (docs/method.md#the-decoder).

The mixin talks to the backbone only through `padt.model.backbones.base.VisionLanguageBackbone`; the concrete classes
(e.g. `padt.model.backbones.qwen2_5_vl.PaDTForConditionalGeneration`) put it in front of transformers' own model class.
The authors' argument forms (`is_main`, the four `past_*` tensors) are translated by `padt.legacy`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_utils import slice_logits_to_keep

from padt import legacy
from padt.model.backbones.base import VisionLanguageBackbone
from padt.model.decoder import PaDTDecoder
from padt.model.decoder.vl_decode import vl_decode as _vl_decode
from padt.model.image_state import VRTImageState, assign_images_to_rows, cells_per_image
from padt.model.outputs import PaDTCausalLMOutput, PaDTGenerateOutput
from padt.model.prototypes import (
    VisualPrototypeProjection,
    ZeroInitLayerNorm,
    build_vis_proj,
    embed_with_prototypes,
    extended_logits,
)

PADT_MODULE_NAMES = ("vis_norm", "vis_proj", "vl_decoder")


class PaDTModelMixin(VisionLanguageBackbone):
    """PaDT's modules and forward/generate/vl_decode; the backbone's hooks come from `VisionLanguageBackbone`."""

    def _init_padt_modules(self, config: Any) -> None:
        """Build PaDT's three modules: `vis_norm`/`vis_proj` (prototypes) and `vl_decoder` (the backbone's
        `__init__` calls this before `post_init`)."""
        text = config.text_config
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

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, *args: Any, allow_missing_padt_weights: bool | None = None,
        allow_missing_weights: bool = False, **kwargs: Any
    ) -> PaDTModelMixin:
        """transformers' `from_pretrained`, plus checks of the path and of the weights.

        A local folder must exist and hold `config.json`, its weights and complete safetensors files (else
        `FileNotFoundError` / `ValueError` naming the file, before anything is built; `padt.model.loading`). Any
        checkpoint that lacks backbone (LLM, vision tower) weights raises `ValueError` naming them, unless
        `allow_missing_weights=True` (`lm_head.weight` of tied embeddings is not missing). A base backbone checkpoint
        (no `vl_decoder` in its config.json) starts PaDT training: the new modules are initialised (`vis_norm` = 0,
        N(0, 0.02) linears). A PaDT checkpoint (its config has `vl_decoder`) that lacks any PaDT weight raises
        `ValueError` naming them, unless `allow_missing_padt_weights=True`.
        """
        from padt.model.loading import HUB_KWARGS, check_loaded_weights, check_model_folder, resolve_source

        folder = None
        if pretrained_model_name_or_path is not None:  # None: transformers builds from `config` + `state_dict`
            hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
            folder = resolve_source(pretrained_model_name_or_path, **hub_kwargs)
        if folder is not None and not kwargs.get("gguf_file"):
            check_model_folder(folder)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        check_loaded_weights(
            pretrained_model_name_or_path, model, info["missing_keys"], PADT_MODULE_NAMES,
            allow_missing_weights=allow_missing_weights, allow_missing_padt_weights=allow_missing_padt_weights,
            config_kwargs={k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only", "token", "subfolder")
                           if k in kwargs},
        )
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ZeroInitLayerNorm):  # prototypes start at exactly 0 (docs/method.md#visual-reference-prototypes)
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
        feats = self.encode_vision(pixel_values, image_grid_thw)
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
                "to global ids for this batch's images (`VRTCodec.to_global`) and pass "
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
        r"""PaDT forward. Same inputs as the backbone plus the image state of earlier calls.

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
        if not is_main:  # the authors' trainer reaches vl_decode through forward
            positionals = (input_ids, attention_mask, position_ids, past_key_values, inputs_embeds)
            return self.vl_decode(**legacy.vl_decode_arguments(positionals, kwargs))
        if pixel_values_videos is not None:
            raise ValueError("PaDT supports images only: VRTs point at image cells; pass videos as frames of images")

        cfg = self.config
        V = cfg.vrt_base_id
        state = padt_state
        if state is None and past_image_embeds is not None:
            batch = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
            state = legacy.state_from_past(
                past_image_embeds, past_logit_mask, past_high_res_image_embeds, past_visual_pe, V, batch
            )
        if pixel_values is not None and (state is None or state.image_embeds is None):
            if image_grid_thw is None:
                raise ValueError("pixel_values were given without image_grid_thw")
            state = self.encode_image_state(pixel_values, image_grid_thw, input_ids)

        embed = self.get_input_embeddings()
        image_embeds = None
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
            if mm_token_type_ids is None:
                mm_token_type_ids = self.mm_token_type_ids_from(input_ids)
        elif state is not None and state.image_embeds is not None and pixel_values is not None:
            raise ValueError("with inputs_embeds, insert the image features yourself and pass no pixel_values")

        if position_ids is None and past_len > 0:
            position_ids = self.manual_decode_position_ids(
                inputs_embeds.shape[:2], past_len, attention_mask, inputs_embeds.device
            )

        outputs = self.run_language_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            image_embeds=image_embeds,
            image_grid_thw=image_grid_thw if image_embeds is not None else None,
            mm_token_type_ids=mm_token_type_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
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
            rope_deltas=self.output_rope_deltas(attention_mask) if past_len == 0 else None,
            last_hidden_state=hidden,
            **legacy.past_outputs(state, V, batch, derived),
            padt_state=state,
        )

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
        """Boxes, scores and masks per object (the authors' API; docs/method.md#the-decoder).

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
        embeddings) is passed to every step through `model_kwargs` and the KV cache, and returned (as `padt_state`, and
        under the authors' attribute names) when `return_dict_in_generate=True`, together with `vrt_hidden_states` (B, T_new, H), the final-norm
        state that predicted each generated token. Generated VRT ids are global (`V + j`).
        """
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        pixel_values = kwargs.pop("pixel_values", None)
        state = kwargs.pop("padt_state", None)
        past = {k: kwargs.pop(k) for k in legacy.PAST_STATE_KWARGS if k in kwargs}
        if state is None and pixel_values is not None:
            if kwargs.get("image_grid_thw") is None:
                raise ValueError("pixel_values were given without image_grid_thw")
            state = self.encode_image_state(pixel_values, kwargs["image_grid_thw"], input_ids)
        elif state is None and past.get("past_image_embeds") is not None:
            state = legacy.state_from_past(**past, vocab_rows=self.config.vrt_base_id, batch_size=input_ids.shape[0])
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
        return PaDTGenerateOutput(
            **{k: v for k, v in out.items()},
            **legacy.past_outputs(state, self.config.vrt_base_id, out.sequences.shape[0]),
            vrt_hidden_states=None if state is None else state.stacked_step_hidden(),
            padt_state=state,
        )

