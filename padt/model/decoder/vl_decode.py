"""`vl_decode`: pack per-sample object features for :class:`~padt.model.decoder.decoder.PaDTDecoder`, unpack its
outputs.

This is the authors' ``PaDTForConditionalGeneration.vl_decode`` in `src/PaDT/models/padt.py`
(docs/method.md#the-decoder) with three changes:

* geometry comes from ``spatial_merge_size`` (the authors hard-code ``// 4``);
* a sample may own several images or none (``image_sample_idx``), with an explicit object -> image assignment
  (``object_image_idx``); by default sample i owns image i, as in the authors' code;
* with no object at all nothing is run unless ``dummy_when_empty=True`` (the authors always run a dummy pass; it is
  only needed to keep distributed ranks in step during training).

Each image's memory is projected once and shared by its objects inside the decoder (the authors copy the raw image
memory per object); the result is the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from padt.model.decoder.decoder import PaDTDecoder

__all__ = ["vl_decode"]


def _as_int_list(x: Sequence[int] | torch.Tensor, name: str) -> list[int]:
    if torch.is_tensor(x):
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    return [int(v) for v in x]


def _resolve_images(
    object_vp_feats: Sequence[Sequence[torch.Tensor]],
    num_images: int,
    image_sample_idx: Sequence[int] | torch.Tensor | None,
    object_image_idx: Sequence[Sequence[int]] | None,
) -> list[list[int]]:
    """Image index of every object, nested like `object_vp_feats`; ValueError on any inconsistency."""
    num_samples = len(object_vp_feats)
    if image_sample_idx is None:
        if num_samples != num_images:
            raise ValueError(
                f"object_vp_feats has {num_samples} samples but there are {num_images} images; by default sample i "
                "owns image i, pass image_sample_idx (num_images,) when samples own several images or none"
            )
        owner = list(range(num_images))
    else:
        owner = _as_int_list(image_sample_idx, "image_sample_idx")
        if len(owner) != num_images:
            raise ValueError(f"image_sample_idx has {len(owner)} entries but image_grid_thws has {num_images} rows")
        if owner and (min(owner) < 0 or max(owner) >= num_samples):
            raise ValueError(f"image_sample_idx {owner} out of range for {num_samples} samples")
    images_of = [[i for i, s in enumerate(owner) if s == b] for b in range(num_samples)]

    if object_image_idx is not None:
        if len(object_image_idx) != num_samples:
            raise ValueError(
                f"object_image_idx has {len(object_image_idx)} samples, object_vp_feats has {num_samples}"
            )
        resolved = []
        for b, (objs, imgs) in enumerate(zip(object_vp_feats, object_image_idx)):
            imgs = _as_int_list(imgs, f"object_image_idx[{b}]")
            if len(imgs) != len(objs):
                raise ValueError(f"sample {b}: {len(objs)} objects but {len(imgs)} entries in object_image_idx[{b}]")
            for j, i in enumerate(imgs):
                if i not in images_of[b]:
                    raise ValueError(
                        f"sample {b} object {j}: image {i} is not one of the sample's images {images_of[b]}"
                    )
            resolved.append(imgs)
        return resolved

    resolved = []
    for b, objs in enumerate(object_vp_feats):
        if objs and len(images_of[b]) != 1:
            raise ValueError(
                f"sample {b} has {len(objs)} objects and {len(images_of[b])} images; pass object_image_idx to say "
                "which image each object belongs to"
            )
        resolved.append([images_of[b][0]] * len(objs) if objs else [])
    return resolved


def _check_features(object_vp_feats: Sequence[Sequence[torch.Tensor]], width: int) -> None:
    if isinstance(object_vp_feats, torch.Tensor) or not isinstance(object_vp_feats, Sequence):
        raise TypeError("object_vp_feats must be a list (per sample) of lists (per object) of (n_vrt, H) tensors")
    for b, objs in enumerate(object_vp_feats):
        if isinstance(objs, torch.Tensor) or not isinstance(objs, Sequence):
            raise TypeError(f"object_vp_feats[{b}] must be a list of (n_vrt, H) tensors, got {type(objs).__name__}")
        for j, f in enumerate(objs):
            if not torch.is_tensor(f) or f.dim() != 2:
                shape = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
                raise ValueError(f"object_vp_feats[{b}][{j}] must be a (n_vrt, {width}) tensor, got {shape}")
            if f.shape[1] != width:
                raise ValueError(
                    f"object_vp_feats[{b}][{j}] has feature width {f.shape[1]}, the decoder expects {width} "
                    "(llm_hidden_size)"
                )
            if f.shape[0] < 1:
                raise ValueError(f"object_vp_feats[{b}][{j}] has no VRT features (shape {tuple(f.shape)})")


def _decoder_param(decoder: PaDTDecoder) -> torch.Tensor:
    return decoder.input_projection[1].weight


def _dummy_pass(decoder: PaDTDecoder, compute_mask: bool) -> torch.Tensor:
    """Run the decoder on one zero object over a zero image of one merged cell; return a 0-valued scalar whose
    graph reaches every decoder parameter the normal pass uses (add it to the loss so distributed ranks stay in step).
    """
    ref = _decoder_param(decoder)
    m = decoder.spatial_merge_size
    grid = torch.tensor([[1, m, m]], dtype=torch.long, device=ref.device)
    pe = (
        torch.ones(m * m, decoder.head_dim, dtype=torch.float32, device=ref.device),
        torch.zeros(m * m, decoder.head_dim, dtype=torch.float32, device=ref.device),
    )
    out = decoder(
        ref.new_zeros(1, decoder.llm_hidden_size),
        [1],
        ref.new_zeros(1, decoder.llm_hidden_size),
        ref.new_zeros(m * m, decoder.hidden_size),
        pe,
        grid,
        [0],
        compute_mask=compute_mask,
    )
    return sum(v.sum() for v in out.values() if v is not None) * 0.0


def vl_decode(
    decoder: PaDTDecoder,
    object_vp_feats: Sequence[Sequence[torch.Tensor]],
    low_res_image_embeds: torch.Tensor,
    high_res_image_embeds: torch.Tensor,
    image_grid_thws: torch.Tensor,
    visual_pes: tuple[torch.Tensor, torch.Tensor],
    *,
    spatial_merge_size: int,
    dummy_when_empty: bool = False,
    image_sample_idx: Sequence[int] | torch.Tensor | None = None,
    object_image_idx: Sequence[Sequence[int]] | None = None,
    compute_mask: bool | None = None,
) -> dict:
    """Decode every object of a batch into a box, a score and a mask.

    Args:
        decoder (`PaDTDecoder`): the decoder (its `spatial_merge_size` must equal `spatial_merge_size`).
        object_vp_feats (`list` of `list` of `torch.Tensor` of shape `(n_vrt, L)`): per sample, per object, the
            features of the object's VRTs (LLM hidden states, or prototypes during warm-up). Empty lists are fine.
        low_res_image_embeds (`torch.Tensor` of shape `(sum_i n_i / merge^2, L)`): prototypes of all images.
        high_res_image_embeds (`torch.Tensor` of shape `(sum_i n_i, D)`): pre-merger ViT states of all images.
        image_grid_thws (`torch.Tensor` of shape `(num_images, 3)`): (t, h, w) per image, n_i = t*h*w.
        visual_pes (`tuple` of two `torch.Tensor` of shape `(sum_i n_i, head_dim)`): ViT rotary (cos, sin).
        spatial_merge_size (`int`): ViT patches per merged cell side.
        dummy_when_empty (`bool`): with no object in the whole batch, still run the decoder once on a dummy input
            (training under DDP/ZeRO: every rank must run the same modules); `dummy_loss` then carries its graph.
        image_sample_idx (`Sequence[int]` of length num_images, *optional*): the sample each image belongs to.
            Default: image i belongs to sample i (the authors' one-image-per-sample layout).
        object_image_idx (`list` of `list` of `int`, *optional*): nested like `object_vp_feats`, the global image
            index of each object (must be one of its sample's images). Default: the sample's only image (a sample
            with objects must then own exactly one image).
        compute_mask (`bool`, *optional*): run the mask head; defaults to `decoder.use_mask_head`.

    Returns:
        `dict` with
        - `pred_boxes` (`(N, 4)`): sigmoid (cx, cy, w, h), normalised to the object's image;
        - `pred_score` (`(N, 1)`): score logits;
        - `pred_mask` (`(N, s*H_max, s*W_max)`, s = `decoder.mask_upscale` = 4): mask logits, 0 outside each object's
          image; `(0, s*merge, s*merge)` when N = 0; None when the mask head is off;
        - `pred_mask_valid_hw` (pair of int64 `(N,)` tensors): the (h, w) patch grid of each object's image;
        - `sample_idx` (`list[int]`): the sample of each object (objects in sample order, then object order);
        - `object_image_idx` (`list[int]`): the image of each object;
        - `dummy_loss` (scalar): 0; when the dummy pass ran, its graph reaches the decoder parameters.
    """
    if not isinstance(decoder, PaDTDecoder):
        raise TypeError(f"decoder must be a PaDTDecoder, got {type(decoder).__name__}")
    if spatial_merge_size != decoder.spatial_merge_size:
        raise ValueError(
            f"spatial_merge_size={spatial_merge_size} differs from the decoder's {decoder.spatial_merge_size}"
        )
    compute_mask = decoder.use_mask_head if compute_mask is None else bool(compute_mask)
    grid = decoder.check_image_inputs(low_res_image_embeds, high_res_image_embeds, visual_pes, image_grid_thws)
    _check_features(object_vp_feats, decoder.llm_hidden_size)
    image_of = _resolve_images(object_vp_feats, grid.shape[0], image_sample_idx, object_image_idx)

    feats = [f for objs in object_vp_feats for f in objs]
    sample_idx = [b for b, objs in enumerate(object_vp_feats) for _ in objs]
    obj_img = [i for imgs in image_of for i in imgs]
    ref = _decoder_param(decoder)
    device = low_res_image_embeds.device

    if not feats:
        dummy = _dummy_pass(decoder, compute_mask) if dummy_when_empty else ref.new_zeros(())
        side = decoder.mask_upscale * spatial_merge_size  # one merged cell's worth of mask pixels
        empty_long = torch.zeros(0, dtype=torch.long, device=device)
        return {
            "pred_boxes": ref.new_zeros(0, 4).to(device),
            "pred_score": ref.new_zeros(0, 1).to(device),
            "pred_mask": ref.new_zeros(0, side, side).to(device) if compute_mask else None,
            "pred_mask_valid_hw": (empty_long, empty_long.clone()),
            "sample_idx": [],
            "object_image_idx": [],
            "dummy_loss": dummy,
        }

    out = decoder(
        torch.cat([f.to(device) for f in feats], 0),
        [f.shape[0] for f in feats],
        low_res_image_embeds,
        high_res_image_embeds,
        visual_pes,
        grid,
        obj_img,
        compute_mask=compute_mask,
    )
    obj_grid = grid[torch.tensor(obj_img, dtype=torch.long)].to(device)
    return {
        "pred_boxes": out["pred_boxes"],
        "pred_score": out["pred_score"],
        "pred_mask": out["pred_mask"],
        "pred_mask_valid_hw": (obj_grid[:, 1].clone(), obj_grid[:, 2].clone()),
        "sample_idx": sample_idx,
        "object_image_idx": obj_img,
        "dummy_loss": out["pred_boxes"].new_zeros(()),
    }
