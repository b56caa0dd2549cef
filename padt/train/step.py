"""The loss of one training batch: forward, decoder on the objects' VRT features, then the criterion's terms.

Where it sits: `padt.train.run` -> `padt.train.build` -> `PaDTTrainer.compute_loss` -> `compute_padt_loss` (here) ->
`padt.train.criterion.PaDTCriterion` -> `padt.train.losses`. `compute_padt_loss` consumes the collator's batch
(`padt.data.collator`) and runs the model; the criterion computes, names and weighs every term (auxiliary ones
included), so this module has no branch per loss. It is the authors' `compute_loss`
(`src/PaDT/trainer/padt_sft_trainer.py`; docs/method.md#the-training-step-and-losses) with these changes:

* logits are kept only for the completion (`logits_to_keep`) and cast to fp32 only there (`padt.train.row_cross_entropy`);
* decoder features are read from the final-norm states the forward returns (no `output_hidden_states`);
* objects are matched to decoder outputs by order, and each object's image comes from its VRT cells (samples may own
  several images);
* a batch or rank without objects runs a dummy decoder pass whose zero-valued loss reaches every decoder parameter,
  so DDP/ZeRO ranks stay in step; the decoder losses are then 0;
* box and mask normalisers are all-reduced across ranks (`PaDTCriterion.normalisers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from padt.legacy import authors_loss_names
from padt.processing.features import gather_positions, gather_rows, unpack_per_object
from padt.processing.vrt import cell_offsets, cells_per_image
from padt.train.criterion import PaDTCriterion
from padt.train.losses import pad_gt_masks

__all__ = ["compute_padt_loss", "object_features", "unwrap_padt_model"]


def unwrap_padt_model(model: nn.Module) -> nn.Module:
    """The `PaDTForConditionalGeneration` inside DDP / DeepSpeed wrappers (`.module`); PEFT models forward attribute
    access themselves. Raises `TypeError` when no object with `vl_decode` is found."""
    m = model
    # unwrap `.module` first: a DeepSpeed engine forwards unknown attributes (so it "has" vl_decode) but its own
    # `.config` is DeepSpeed's dict
    while isinstance(getattr(m, "module", None), nn.Module):
        m = m.module
    if not hasattr(m, "vl_decode"):
        raise TypeError(f"{type(model).__name__} is not a PaDT model (no vl_decode), nor a wrapper of one")
    return m


def _image_of_cells(cells: torch.Tensor, image_starts: torch.Tensor) -> torch.Tensor:
    """Image index of each global cell, given each image's first global cell `(num_images,)` (`cell_offsets`)."""
    return torch.searchsorted(image_starts, cells, right=True) - 1


def object_features(
    objects: Sequence[Sequence[Mapping[str, Any]]],
    *,
    hidden: torch.Tensor,
    prototypes: torch.Tensor,
    prompt_length: int,
    use_prototype_features: bool,
) -> list[list[torch.Tensor]]:
    """Decoder input features of every object, nested per sample (the gatherers of `padt.processing.features`).

    Args:
        objects: per sample, per object, dicts with `vrt_positions` (completion indices t) and `vrt_cells` (global).
        hidden (`torch.Tensor` of shape `(B, P + C, H)`): final-norm hidden states.
        prototypes (`torch.Tensor` of shape `(N_cells, H)`): the batch's visual prototypes.
        prompt_length (`int`): P.
        use_prototype_features (`bool`): warm-up: the prototypes of the object's VRT cells instead of the hidden
            states `hidden[b, P - 1 + t]` that predicted its VRTs.
    Returns:
        per sample, per object, `(n_vrt, H)` tensors.
    """
    key = "vrt_cells" if use_prototype_features else "vrt_positions"
    ids = []
    for b, objs in enumerate(objects):
        ids.append([])
        for j, obj in enumerate(objs):
            ids[b].append([int(i) for i in obj[key]])
            if not ids[b][j]:
                raise ValueError(f"sample {b} object {j} has no {key}; every object needs at least one VRT")
    if use_prototype_features:
        lengths = [len(cells) for row in ids for cells in row]
        packed = gather_rows(prototypes, [c for row in ids for cells in row for c in cells])
    else:
        packed, lengths, _ = gather_positions(hidden, ids, prompt_length - 1)
    return unpack_per_object(packed, lengths, objects)


def _object_images(
    objects: Sequence[Sequence[Mapping[str, Any]]],
    image_grid_thw: torch.Tensor,
    merge: int,
    image_sample_idx: torch.Tensor,
) -> list[list[int]]:
    """Image of every object (from its VRT cells), checked to be one image of its own sample."""
    cells = cells_per_image(image_grid_thw, merge)
    total = sum(cells)
    starts = torch.tensor(cell_offsets(cells), dtype=torch.long)
    owner = image_sample_idx.cpu().tolist()
    out = []
    for b, objs in enumerate(objects):
        imgs = []
        for j, obj in enumerate(objs):
            vrt_cells = torch.as_tensor([int(c) for c in obj["vrt_cells"]], dtype=torch.long)
            if vrt_cells.numel() == 0 or int(vrt_cells.min()) < 0 or int(vrt_cells.max()) >= total:
                raise ValueError(
                    f"sample {b} object {j}: vrt_cells {vrt_cells.tolist()} outside the batch's "
                    f"{total} cells"
                )
            img = _image_of_cells(vrt_cells, starts).unique()
            if img.numel() != 1 or owner[int(img[0])] != b:
                raise ValueError(
                    f"sample {b} object {j}: its vrt_cells lie in images {img.tolist()}, expected one "
                    f"image of sample {b}"
                )
            imgs.append(int(img[0]))
        out.append(imgs)
    return out


def _decoder_targets(
    objects: Sequence[Sequence[Mapping[str, Any]]], decoded: Mapping, device: torch.device, need_masks: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """Targets in decoder-output order: `boxes (N, 4)` xyxy fp32 and, when `need_masks`, `masks`/`mask_valid`
    `(N, H, W)`. Returns them and the number of objects with a mask."""
    flat = [obj for objs in objects for obj in objs]
    if flat:
        boxes = torch.stack([torch.as_tensor(o["box_xyxy"], dtype=torch.float32).reshape(4) for o in flat])
    else:
        boxes = torch.zeros(0, 4)
    targets = {"boxes": boxes.to(device)}
    masks = [o.get("mask") for o in flat]
    num_masks = sum(m is not None for m in masks)
    pred_mask = decoded.get("pred_mask")
    if need_masks and pred_mask is not None:
        hs, ws = decoded["pred_mask_valid_hw"]
        if flat:
            scale = pred_mask.shape[-1] // int(ws.max())
            expected = [(scale * int(h), scale * int(w)) for h, w in zip(hs.tolist(), ws.tolist())]
        else:
            expected = []
        gt, valid = pad_gt_masks(masks, tuple(pred_mask.shape[-2:]), expected)
        targets["masks"], targets["mask_valid"] = gt.to(device), valid.to(device)
    return targets, num_masks


def _unused_head_link(decoded: Mapping, criterion: PaDTCriterion) -> torch.Tensor | int:
    """0 * the outputs whose loss is switched off, so their heads still get (zero) gradients (DDP needs a gradient
    for every parameter each step unless `find_unused_parameters`)."""
    link = 0
    if not criterion.use_bbox_loss:
        link = link + decoded["pred_boxes"].sum() * 0.0
    if not criterion.use_score_loss:
        link = link + decoded["pred_score"].sum() * 0.0
    if not criterion.use_mask_loss and decoded.get("pred_mask") is not None:
        link = link + decoded["pred_mask"].sum() * 0.0
    return link


def compute_padt_loss(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    criterion: PaDTCriterion,
    use_prototype_features: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one collated batch.

    Args:
        model: a `PaDTForConditionalGeneration`, possibly wrapped (DDP, DeepSpeed, PEFT); the main forward goes through
            the wrapper, the decoder is called on the unwrapped model.
        batch: the collator's dict: `input_ids (B, P + C)`, `attention_mask`, `mm_token_type_ids`, `pixel_values`,
            `image_grid_thw (num_images, 3)`, `image_sample_idx (num_images,)`, `prompt_length` P,
            `completion_mask (B, C)`, `vrt_rows (N_vrt, 2)`, `robust_cell_mask (N_vrt, N_cells)`, `objects`.
        criterion: the loss terms, auxiliary ones included (`criterion.auxiliary_losses`), and their weights.
        use_prototype_features: warm-up: feed the decoder the prototypes of the objects' VRT cells.
    Returns:
        `(loss, logs)`: the weighted total `criterion.weighted_total` (scalar, differentiable) and detached scalars:
        every loss key, `iou`, `giou`, the auxiliary losses' metrics, the authors' `sft_loss`/`bbox_loss`/
        `score_loss`/`mask_loss` (`padt.legacy.authors_loss_names`), `loss`, `num_objects`.
    """
    input_ids = batch["input_ids"]
    prompt_length = int(batch["prompt_length"])
    completion_length = input_ids.shape[1] - prompt_length
    if prompt_length < 1 or completion_length < 1:
        raise ValueError(
            f"prompt_length={prompt_length} leaves no prompt or no completion in {input_ids.shape[1]} ids"
        )
    completion_mask = batch["completion_mask"]
    if tuple(completion_mask.shape) != (input_ids.shape[0], completion_length):
        raise ValueError(
            f"completion_mask has shape {tuple(completion_mask.shape)}, expected "
            f"{(input_ids.shape[0], completion_length)} (B, total length - prompt_length)"
        )
    objects = batch["objects"]
    if len(objects) != input_ids.shape[0]:
        raise ValueError(f"batch['objects'] has {len(objects)} samples for {input_ids.shape[0]} rows")

    out = model(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"),
        mm_token_type_ids=batch.get("mm_token_type_ids"),
        logits_to_keep=completion_length + 1,
        use_cache=False,
    )
    robust = batch.get("robust_cell_mask")
    num_cells = 0 if out.padt_state is None else out.padt_state.num_cells
    if robust is not None and robust.shape[-1] != num_cells:
        raise ValueError(f"robust_cell_mask has {robust.shape[-1]} cell columns, the batch's images have {num_cells}")
    # logits[:, t] (t < C) predicts completion token t
    losses = criterion.loss_ce(
        out.logits[:, :-1],
        input_ids[:, prompt_length:],
        completion_mask,
        batch.get("vrt_rows"),
        robust,
    )
    extra: torch.Tensor | float = 0.0  # zero-valued terms that keep the decoder in the graph
    num_objects = sum(len(objs) for objs in objects)

    if criterion.uses_decoder:
        padt = unwrap_padt_model(model)
        state = out.padt_state
        if state is None:
            raise ValueError("the decoder losses need images (pixel_values, image_grid_thw) in the batch")
        image_sample_idx = batch.get("image_sample_idx")
        if image_sample_idx is None:
            image_sample_idx = state.image_sample_idx
        feats = object_features(
            objects,
            hidden=out.last_hidden_state,
            prototypes=state.prototypes,
            prompt_length=prompt_length,
            use_prototype_features=use_prototype_features,
        )
        decoded = padt.vl_decode(
            feats,
            state.prototypes,
            state.high_res_embeds,
            state.image_grid_thw,
            state.pos_embeds,
            dummy_when_empty=True,
            image_sample_idx=image_sample_idx,
            object_image_idx=_object_images(
                objects, state.image_grid_thw, padt.config.spatial_merge_size, image_sample_idx
            ),
        )
        device = decoded["pred_boxes"].device
        targets, num_masks = _decoder_targets(objects, decoded, device, criterion.use_mask_loss)
        num_boxes, mask_denominator = criterion.normalisers(num_objects, num_masks, device)
        losses.update(criterion(decoded, targets, num_boxes=num_boxes, num_masks=mask_denominator))
        extra = decoded["dummy_loss"] + _unused_head_link(decoded, criterion)

    losses.update(criterion.loss_auxiliary(model, batch, out))
    total = criterion.weighted_total(losses) + extra

    logs = {k: v.detach() for k, v in losses.items()}
    logs.update({k: v.detach() for k, v in authors_loss_names(losses).items()})
    logs["loss"] = total.detach()
    logs["num_objects"] = torch.tensor(float(num_objects))
    return total, logs
