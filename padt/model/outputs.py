"""Output dataclasses of `PaDTForConditionalGeneration` (documented like transformers' own ModelOutputs)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import ModelOutput

from padt.model.image_state import VRTImageState


class _FieldNamesOnce:
    """`ModelOutput.__setattr__` with the field names computed once per class.

    transformers' version calls `dataclasses.fields` on every assignment, and the dataclass `__init__` assigns every
    field, so building an output costs O(fields^2): 90 us for our 12 fields against 30 us here, which was 1 % of a
    decode step on the bench config (bench/README.md). Same behaviour: a non-None value of a field is also stored as a
    dict item, and every value is stored as an attribute.
    """

    _field_names_cache: frozenset[str] | None = None

    def __setattr__(self, name: str, value: object) -> None:
        cls = type(self)
        names = cls.__dict__.get("_field_names_cache")
        if names is None:
            names = frozenset(f.name for f in fields(cls))
            cls._field_names_cache = names
        if name in names and value is not None:
            OrderedDict.__setitem__(self, name, value)  # what ModelOutput's super().__setitem__ resolves to
        object.__setattr__(self, name, value)


@dataclass
class PaDTCausalLMOutput(_FieldNamesOnce, ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*):
        Next-token cross-entropy over text + VRT ids (fp32, label positions only), when `labels` are given.
    logits (`torch.FloatTensor` of shape `(B, L, V + N_cells)`):
        Scores over the text vocabulary (V rows) followed by the batch's prototypes (global VRT ids `V + j`); `-inf`
        where a row may not emit (other samples' prototypes; the authors' per-image mask, done per batch row).
    past_key_values (`Cache`, *optional*): the LLM's KV cache.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): per-layer LLM states when `output_hidden_states=True`.
    attentions (`tuple(torch.FloatTensor)`, *optional*).
    rope_deltas (`torch.LongTensor` of shape `(B, 1)`, *optional*): M-RoPE deltas of the prefill.
    last_hidden_state (`torch.FloatTensor` of shape `(B, L, H)`):
        Final-norm hidden states (the decoder's VRT features come from here; no need to keep every layer).
    past_image_embeds (`torch.FloatTensor` of shape `(N_cells, H)`, *optional*): prototypes P (authors' name).
    past_logit_mask (`torch.BoolTensor` of shape `(B, V + N_cells)`, *optional*): per-row logit mask (authors' name;
        theirs had one row per image, which is the same when every sample has one image).
    past_high_res_image_embeds (`torch.FloatTensor` of shape `(N_patches, D_vit)`, *optional*): pre-merger features.
    past_visual_pe (`tuple` of two `(N_patches, head_dim_vit)` tensors, *optional*): ViT rotary (cos, sin).
    padt_state (`VRTImageState`, *optional*): all of the above in one object, to pass back as `padt_state=`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    rope_deltas: torch.LongTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    past_image_embeds: torch.FloatTensor | None = None
    past_logit_mask: torch.BoolTensor | None = None
    past_high_res_image_embeds: torch.FloatTensor | None = None
    past_visual_pe: tuple[torch.FloatTensor, torch.FloatTensor] | None = None
    padt_state: VRTImageState | None = None


@dataclass
class PaDTGenerateOutput(GenerateDecoderOnlyOutput):
    r"""
    `generate(..., return_dict_in_generate=True)` output: transformers' fields plus the image state (authors' names)
    and the features of generated tokens.

    past_image_embeds, past_logit_mask, past_high_res_image_embeds, past_visual_pe: as in `PaDTCausalLMOutput`.
    vrt_hidden_states (`torch.FloatTensor` of shape `(B, T_new, H)`, *optional*):
        Final-norm hidden state that predicted each generated token (index t -> token t of the completion); the
        decoder's object features are its rows at VRT positions. Recorded without `output_hidden_states`.
    padt_state (`VRTImageState`, *optional*).
    """

    past_image_embeds: torch.FloatTensor | None = None
    past_logit_mask: torch.BoolTensor | None = None
    past_high_res_image_embeds: torch.FloatTensor | None = None
    past_visual_pe: tuple[torch.FloatTensor, torch.FloatTensor] | None = None
    vrt_hidden_states: torch.FloatTensor | None = None
    padt_state: VRTImageState | None = None
