"""The authors' compatibility surface, and nothing else.

PaDT's authors (github.com/Gorilla-Lab-SCUT/PaDT) published `PaDTForConditionalGeneration`, `VisonTextProcessingClass`
[sic], `parseVRTintoCompletion`, `model.vl_decode`, `forward(is_main=...)`, the four `past_*` image-state arguments, the
transformers-4.50 path `model.model.embed_tokens` and their aggregate loss names. Code written against their API keeps
working through this module; padt's own API (`PaDTProcessor`, `parse_completion`, `PaDTPredictor`, `VRTImageState`)
never uses it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature

from padt.model.image_state import VRTImageState
from padt.model.vision import VisionFeatures
from padt.processing.features import (
    gather_object_features,
    gather_object_prototypes,
    gather_positions,
    numpy_gather_ok,
    unpack_per_object,
)
from padt.processing.parsing import CompletionParser
from padt.processing.processor import VRTTextMixin, check_vrt_base, detect_vrt_base
from padt.processing.vrt import VRTCodec


# ============================================================================ processing (VisonTextProcessingClass)
class VisonTextProcessingClass(VRTTextMixin):
    """The authors' processor wrapper [sic] (``src/PaDT/models/padt_processor.py``; docs/method.md#parsing-completions),
    same public methods, without their side effects. padt's own processor is `padt.processing.PaDTProcessor`.

    Differences from the original: no tokens are ever added (``prepare`` only records V and checks the tokenizer),
    ``assign_to_*_vrt_id`` return new tensors instead of editing their input in place (use the return value),
    and rows with several images or none work (``image_sample_idx``). Unknown attributes are delegated to the
    wrapped processor (``apply_chat_template``, ``tokenizer``, ``save_pretrained``, ...).

    Args:
        processing_class: a Qwen2.5-VL processor (`padt.processing.load_processor` or `AutoProcessor`).
        spatial_merge_size (`int`): patches merged per cell side (``model.config.vision_config.spatial_merge_size``).
    """

    def __init__(self, processing_class, spatial_merge_size: int = 2):
        self.__dict__["_processor"] = processing_class
        self.processing_class = processing_class
        self.spatial_merge_size = int(spatial_merge_size)
        detected = detect_vrt_base(processing_class.tokenizer)
        self.model_embed_token_size = detected if detected is not None else len(processing_class.tokenizer)
        self.image_grid_thw = None

    @property
    def vrt_base_id(self) -> int:
        return self.model_embed_token_size

    def prepare(self, n: int) -> None:
        """Set V = ``n`` (the model's embedding rows, ``model.get_input_embeddings().weight.shape[0]``).

        Checks the tokenizer against it (`ValueError` on a mismatch); adds no tokens.
        """
        check_vrt_base(self.tokenizer, int(n))
        self.model_embed_token_size = int(n)

    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        out = self._call_processor(images=images, text=text, videos=videos, **kwargs)
        if "image_grid_thw" in out:
            self.set_image_grid_thw(out["image_grid_thw"])
        return out

    def set_image_grid_thw(self, image_grid_thw) -> None:
        """Record the last image grids (the original also added VRT tokens here; ids are arithmetic now)."""
        self.image_grid_thw = image_grid_thw

    def assign_to_global_vrt_id(self, ids: torch.Tensor, image_grid_thw, image_sample_idx=None) -> torch.Tensor:
        """Local -> global VRT ids, as a **new** tensor (`VRTCodec.to_global`)."""
        return self.codec.to_global(ids, image_grid_thw, image_sample_idx)

    def assign_to_local_vrt_id(self, ids: torch.Tensor, image_grid_thw, image_sample_idx=None) -> torch.Tensor:
        """Global -> local VRT ids, as a **new** tensor (`VRTCodec.to_local`)."""
        return self.codec.to_local(ids, image_grid_thw, image_sample_idx)

    def __getattr__(self, name: str):
        if name.startswith("__") or "_processor" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_processor"], name)


# ============================================================================ parsing (parseVRTintoCompletion)
_CPU_GRAIN = 32768  # torch runs CPU ops on more elements than this in its thread pool


def _generation_rows(hidden_states, steps: list[int]) -> torch.Tensor:
    """Last-layer state of the last position of each step: `(B, len(steps), H)` from the ``[step][layer]`` layout."""
    last = [hidden_states[t][-1] for t in steps]  # each (B, L_t, H)
    B, H = last[0].shape[0], last[0].shape[-1]
    if B * len(last) * H > _CPU_GRAIN and numpy_gather_ok(last[0]):  # large: avoid torch's threaded copy
        return torch.from_numpy(np.concatenate([x.detach().numpy()[:, -1:] for x in last], axis=1))
    return torch.cat([x if x.shape[1] == 1 else x[:, -1:] for x in last], dim=1)


def parseVRTintoCompletion(  # the authors' public name
    processor,
    completion_ids,
    hidden_states,
    need_thinking_mask=None,
    image_prototype: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    *,
    image_sample_idx: torch.Tensor | Sequence[int] | None = None,
):
    """The authors' parser entry point (``parseVRTintoCompletion`` in ``src/PaDT/models/padt_processor.py``;
    docs/method.md#parsing-completions) on top of padt's `CompletionParser` and feature gatherers
    (`padt.processing.features`).

    Args:
        processor: `VisonTextProcessingClass` or `PaDTProcessor` (gives V, the merge size and the tokenizer).
        completion_ids (`torch.LongTensor` of shape `(B, T)`): generated ids with **local** VRT ids.
        hidden_states: generation layout ``[step][layer]`` of `(B, L_t, H)` tensors (feature of completion token
            ``t`` = ``hidden_states[t][-1][b][-1]``), or a `(B, T, H)` tensor already aligned, or None.
        need_thinking_mask: per row, parse only inside ``<answer>...</answer>``. **None means all False** (the
            original defaulted to True, which every caller overrode).
        image_prototype (`torch.Tensor` of shape `(sum cells, H)`) and image_grid_thw `(N, 3)`: if both given,
            ``vrts_feats`` holds each object's prototype rows, and VRT cells outside the row's images are dropped
            with a warning.
        image_sample_idx: row of each image (default: image ``i`` is row ``i``).

    Returns:
        ``(completions, feats, labels, vrts, vrts_feats)``, each a list per row: the decoded completion (special
        tokens and padding included), per object a `(n_vrt, H)` feature tensor (None without hidden states),
        label, concatenated VRT string, and prototype rows (None unless requested). Never raises on malformed
        output; objects parsed before a truncation are kept.
    """
    vrt_base = getattr(processor, "vrt_base_id", None) or getattr(processor, "model_embed_token_size", None)
    if vrt_base is None:
        raise TypeError(f"processor must be a VisonTextProcessingClass or PaDTProcessor (it gives the VRT base id), "
                        f"got {type(processor).__name__}")
    merge = getattr(processor, "spatial_merge_size", None) or processor.image_processor.merge_size
    parser = getattr(processor, "completion_parser", None)
    if parser is None:
        parser = CompletionParser.from_tokenizer(processor.tokenizer, vrt_base)
    rows = completion_ids.tolist() if torch.is_tensor(completion_ids) else [list(r) for r in completion_ids]
    if rows and isinstance(rows[0], int):
        rows = [rows]
    B = len(rows)
    need = [False] * B if need_thinking_mask is None else [bool(x) for x in need_thinking_mask]
    n_steps = None
    if hidden_states is not None:
        n_steps = hidden_states.shape[1] if torch.is_tensor(hidden_states) else len(hidden_states)
    codec = ranges = None
    if image_prototype is not None and image_grid_thw is not None:
        codec = VRTCodec(vrt_base, merge)
        ranges = codec.row_cell_ranges(B, image_grid_thw, image_sample_idx)
    completions, objects = [], []
    for b, ids in enumerate(rows):
        completions.append(parser.decode(ids))
        if n_steps is not None and len(ids) > n_steps:
            warnings.warn(f"row {b}: {len(ids)} completion ids but hidden states for {n_steps} steps; "
                          f"parsing the first {n_steps}", stacklevel=2)
            ids = ids[:n_steps]
        cells = None if ranges is None else sum(c for _, c in ranges[b])
        objects.append(parser.parse(ids, need_thinking=need[b], num_cells=cells))
    labels = [[o.label for o in objs] for objs in objects]
    vrts = [[o.vrt_text for o in objs] for objs in objects]
    feats = [[None] * len(objs) for objs in objects]
    if hidden_states is not None and any(objects):
        if torch.is_tensor(hidden_states):
            packed, lengths, _ = gather_object_features(hidden_states, objects)
        else:  # gather only the VRT steps, then index them all at once
            steps = sorted({p for objs in objects for o in objs for p in o.positions})
            where = {t: i for i, t in enumerate(steps)}
            stacked = _generation_rows(hidden_states, steps)  # (B, S, H)
            packed, lengths, _ = gather_positions(
                stacked, [[[where[p] for p in o.positions] for o in objs] for objs in objects])
        feats = unpack_per_object(packed, lengths, objects)
    vrts_feats = [[None] * len(objs) for objs in objects]
    if codec is not None and any(objects):
        packed, lengths, _ = gather_object_prototypes(image_prototype, objects, image_grid_thw, codec, image_sample_idx)
        vrts_feats = unpack_per_object(packed, lengths, objects)
    return completions, feats, labels, vrts, vrts_feats


# ============================================================================ model (is_main, past_*, embed_tokens)
# The authors keep the image state in four tensors passed back into every decode call: `past_image_embeds` is the
# prototypes P (not the merger output E, which padt calls `image_embeds`), `past_logit_mask` the per-row logit mask,
# `past_high_res_image_embeds` the pre-merge features and `past_visual_pe` the vision rotary (cos, sin). padt keeps
# them in one `VRTImageState` (`padt_state`); these functions translate between the two forms.
PAST_STATE_KWARGS = ("past_image_embeds", "past_logit_mask", "past_high_res_image_embeds", "past_visual_pe")
# `forward(..., is_main=False)`: the authors' trainer calls the decoder through forward (for ZeRO-3 hooks); the first
# five positional arguments are then vl_decode's, in this order.
VL_DECODE_ARG_NAMES = (
    "object_vp_feats", "low_res_image_embeds", "high_res_image_embeds", "image_grid_thws", "visual_pes"
)


def vl_decode_arguments(positionals: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """`vl_decode` keyword arguments from a `forward(..., is_main=False)` call: its first five positional (or
    keyword) values named as `VL_DECODE_ARG_NAMES`, plus the remaining keywords (popped from `kwargs`)."""
    given = {k: v for k, v in zip(VL_DECODE_ARG_NAMES, positionals) if v is not None}
    given.update({k: kwargs.pop(k) for k in VL_DECODE_ARG_NAMES if k in kwargs})
    return {**given, **kwargs}


def state_from_past(
    past_image_embeds: torch.Tensor,
    past_logit_mask: torch.Tensor | None,
    past_high_res_image_embeds: torch.Tensor | None,
    past_visual_pe: tuple[torch.Tensor, torch.Tensor] | None,
    vocab_rows: int,
    batch_size: int,
) -> VRTImageState:
    """Rebuild an image state from the authors' four `past_*` values (decode calls written against their API).

    `past_logit_mask` is `(rows, V + N)`: one row per batch sample (ours) or per image (theirs, one image per sample).
    Without it, prototypes are split evenly in image order, which is only right for equal-size images.
    """
    n = past_image_embeds.shape[0]
    if past_logit_mask is not None:
        if past_logit_mask.shape[-1] != vocab_rows + n:
            raise ValueError(
                f"past_logit_mask has width {past_logit_mask.shape[-1]}, expected vocabulary {vocab_rows} + "
                f"{n} prototypes = {vocab_rows + n}"
            )
        owner = past_logit_mask[:, vocab_rows:].float().argmax(0)
        rows = past_logit_mask.shape[0]
    else:
        rows = batch_size
        owner = torch.arange(n, device=past_image_embeds.device) * rows // max(n, 1)
    return VRTImageState(
        image_embeds=None,
        prototypes=past_image_embeds,
        vision=VisionFeatures(None, past_high_res_image_embeds, past_visual_pe),
        image_grid_thw=None,
        image_sample_idx=torch.arange(rows, device=past_image_embeds.device),
        cell_sample_idx=owner.to(past_image_embeds.device),
        batch_size=rows,
    )


def past_outputs(
    state: VRTImageState | None, vocab_rows: int, batch_size: int, derived: bool = True
) -> dict[str, Any]:
    """The four `past_*` output fields of a forward / generate output from an image state (all None without one).
    `derived=False` (per-step outputs inside `generate`) leaves the three derived ones unset."""
    if state is None:
        return dict.fromkeys(PAST_STATE_KWARGS)
    return {
        "past_image_embeds": state.prototypes,
        "past_logit_mask": state.logit_mask(vocab_rows, batch_size) if derived else None,
        "past_high_res_image_embeds": state.high_res_embeds if derived else None,
        "past_visual_pe": state.pos_embeds if derived else None,
    }


class EmbedTokensAlias:
    """The transformers-4.50 path `model.model.embed_tokens` that the authors' quick-start uses
    (`processor.prepare(model.model.embed_tokens.weight.shape[0])`); mixed into a backbone's inner model."""

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.embed_tokens



# ============================================================================ training logs (the authors' loss names)
# The authors' trainer logs four aggregates (the authors' `compute_loss` in `src/PaDT/trainer/padt_sft_trainer.py`);
# padt logs its unweighted terms separately (`loss_ce`, `loss_giou`, ...) and, for comparison with their curves, these.


def authors_loss_names(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' logged names (unweighted) from padt's loss terms, for the terms present: `sft_loss` = `loss_ce`,
    `bbox_loss` = `loss_giou + loss_bbox`, `score_loss` = `loss_score`, `mask_loss` = `loss_dice + loss_mask`.
    (docs/method.md#the-training-step-and-losses)"""
    out = {"sft_loss": losses["loss_ce"]} if "loss_ce" in losses else {}
    if "loss_giou" in losses:
        out["bbox_loss"] = losses["loss_giou"] + losses["loss_bbox"]
    if "loss_score" in losses:
        out["score_loss"] = losses["loss_score"]
    if "loss_dice" in losses:
        out["mask_loss"] = losses["loss_dice"] + losses["loss_mask"]
    return out
