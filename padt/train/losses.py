"""The functional loss terms of PaDT training: robust cross-entropy, box (L1, GIoU), score, dice, focal, mask padding.

Where they sit: `padt.train.run` -> `padt.train.build` -> `PaDTTrainer.compute_loss` -> `padt.train.step` ->
`padt.train.criterion.PaDTCriterion` (runs the terms, names and weighs them) -> these functions. Each term, keyed as
the criterion logs it (the authors' aggregate in brackets, `padt.legacy.authors_loss_names`):

* ``loss_ce``: robust per-token cross-entropy over text + VRT ids, fp32, completion positions only [``sft_loss``];
* ``loss_giou`` + ``loss_bbox`` (L1 on cxcywh) [``bbox_loss``]; metrics ``iou``, ``giou``;
* ``loss_score``: MSE of ``sigmoid(score) * 2 - 1`` against the detached GIoU [``score_loss``];
* ``loss_dice`` + ``loss_mask`` (sigmoid focal) on each object's valid mask region [``mask_loss``].

Objects are matched to decoder outputs by order (object i of the text is the i-th VRT run). Every function reproduces
the normalisation of the authors' `compute_loss` (`src/PaDT/trainer/padt_sft_trainer.py`), including their epsilons,
so that on the reference batch our numbers equal theirs: ``Σ / (num_boxes + 1e-4)`` for boxes and scores,
``Σ / (num_masks + 1e-5 * num_boxes)`` for masks and ``Σ_t nll / (Σ_t mask + 1e-4)`` per sample for the CE
(docs/method.md#the-training-step-and-losses). `PaDTCriterion` computes the distributed normalisers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from padt.geometry.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, elementwise_generalized_box_iou
from padt.train.row_cross_entropy import row_cross_entropy

__all__ = [
    "box_losses",
    "dice_loss",
    "pad_gt_masks",
    "robust_vrt_cross_entropy",
    "score_loss",
    "sigmoid_focal_loss",
]

CE_EPS = 1e-4  # authors: per-sample Σ nll / (Σ mask + 1e-4)
BOX_EPS = 1e-4  # authors: Σ / (num_boxes + 1e-4)
MASK_EPS_PER_BOX = 1e-5  # authors: Σ / (num_masks + 1e-5 * num_boxes) (reproduces the reference bit for bit)


# ---------------------------------------------------------------------------------------------------- text / VRT CE
def robust_vrt_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    completion_mask: torch.Tensor,
    vrt_rows: torch.Tensor | None = None,
    robust_cell_mask: torch.Tensor | None = None,
    *,
    eps: float = CE_EPS,
) -> torch.Tensor:
    """Per-token cross-entropy over text + VRT ids, computed in fp32 on the completion window only.

    At every VRT target (row j of `vrt_rows`), the logits of the same object's *other* foreground cells
    (`robust_cell_mask[j]`) are set to -inf before the softmax, so sampling one of several equally right cells is not
    penalised by the others (docs/method.md#the-training-step-and-losses; the authors' `compute_loss` in
    `src/PaDT/trainer/padt_sft_trainer.py`). Per sample: `Σ_t nll_t / (Σ_t mask_t + eps)`; then the mean over
    samples.

    Args:
        logits (`torch.Tensor` of shape `(B, C, V + N_cells)`, any float dtype): the logits that predict the C
            completion tokens (position t predicts `targets[:, t]`). `padt.train.row_cross_entropy` casts it to fp32.
        targets (`torch.LongTensor` of shape `(B, C)`): completion ids (text ids, global VRT ids `V + cell`).
        completion_mask (`torch.Tensor` of shape `(B, C)`): 1 on completion tokens (eos included), 0 on pads.
        vrt_rows (`torch.LongTensor` of shape `(N_vrt, 2)`, *optional*): (b, t) of every VRT target to mask.
        robust_cell_mask (`torch.BoolTensor` of shape `(N_vrt, N_cells)`, *optional*): True at the cells whose logit
            (the last N_cells columns of `logits`, i.e. `V + cell`) is set to -inf at that target.
        eps (`float`): the authors' per-sample denominator epsilon.
    Returns:
        `torch.Tensor` of shape `()`, float32.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2] or completion_mask.shape != targets.shape:
        raise ValueError(
            f"expected logits (B, C, K), targets (B, C) and completion_mask (B, C); got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)}, {tuple(completion_mask.shape)}"
        )
    keep = completion_mask.bool()
    batch, length = targets.shape
    hide_index = hide = None
    if robust_cell_mask is not None and robust_cell_mask.numel():
        if vrt_rows is None or vrt_rows.dim() != 2 or vrt_rows.shape != (robust_cell_mask.shape[0], 2):
            raise ValueError(
                f"robust_cell_mask {tuple(robust_cell_mask.shape)} needs vrt_rows of shape (N_vrt, 2), one row per "
                f"mask row, got {None if vrt_rows is None else tuple(vrt_rows.shape)}"
            )
        num_cells = robust_cell_mask.shape[1]
        text_cols = logits.shape[-1] - num_cells
        if text_cols < 0:
            raise ValueError(f"robust_cell_mask has {num_cells} cells but the logits only {logits.shape[-1]} columns")
        vrt_rows = vrt_rows.to(keep.device)
        if not bool(keep[vrt_rows[:, 0], vrt_rows[:, 1]].all()):
            j = int((~keep[vrt_rows[:, 0], vrt_rows[:, 1]]).nonzero()[0, 0])
            raise ValueError(
                f"vrt_rows[{j}] = {vrt_rows[j].tolist()} is not a completion position (completion_mask 0)"
            )
        hide_index = vrt_rows[:, 0] * length + vrt_rows[:, 1]  # N_vrt flat (b, t) rows
        if hide_index.unique().numel() != hide_index.numel():
            raise ValueError("vrt_rows lists the same (b, t) position twice")
        vrt_targets = targets.reshape(-1)[hide_index]
        if bool((vrt_targets < text_cols).any()):
            j = int((vrt_targets < text_cols).nonzero()[0, 0])
            raise ValueError(
                f"vrt_rows[{j}] = {vrt_rows[j].tolist()} targets text id {int(vrt_targets[j])}, not a VRT"
            )
        hide = robust_cell_mask.to(device=keep.device, dtype=torch.bool)
        if bool(hide.gather(1, (vrt_targets - text_cols)[:, None]).any()):
            raise ValueError(
                "robust_cell_mask hides the target cell of a VRT token; the picked cell must stay visible"
            )

    # every (b, t) row is computed (no gather of the kept rows; padding rows are dropped by the `where`)
    nll = row_cross_entropy(logits, torch.where(keep, targets, 0), hide_index, hide).view(batch, length)
    nll = torch.where(keep, nll, 0.0)
    per_sample = nll.sum(1) / (keep.sum(1).to(nll.dtype) + eps)
    return per_sample.mean()


# ---------------------------------------------------------------------------------------------------- boxes
def _share(num_local: int, num_boxes: float) -> float:
    """This rank's share of the objects: 1 in a single process with objects, 0 without (so the GIoU loss is 0)."""
    return num_local / num_boxes if num_boxes > 0 else 0.0


def box_losses(
    pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, num_boxes: float, *, eps: float = BOX_EPS
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GIoU loss and L1 loss of matched boxes, plus the IoU/GIoU metrics.

    `loss_giou = share - Σ giou / (num_boxes + eps)` (the authors' `1 - Σ giou / (N + 1e-4)`; `share` = this rank's
    fraction of the objects, 1 in a single process, 0 without objects);
    `loss_bbox = Σ |pred - cxcywh(gt)| / (num_boxes + eps)` (summed over the 4 coordinates);
    `iou`, `giou`: `Σ / (num_boxes + eps)`.

    Args:
        pred_boxes (`torch.Tensor` of shape `(N, 4)`): predicted (cx, cy, w, h) in [0, 1].
        gt_boxes (`torch.Tensor` of shape `(N, 4)`): ground-truth (x0, y0, x1, y1) in [0, 1].
        num_boxes (`float`): the normalising object count (all-reduced mean over ranks when distributed).
    Returns:
        (`dict` with scalar `loss_bbox`, `loss_giou`, `iou`, `giou`; per-pair GIoU `(N,)` for the score loss).
    """
    if pred_boxes.shape != gt_boxes.shape or pred_boxes.dim() != 2:
        raise ValueError(
            f"pred_boxes and gt_boxes must both be (N, 4), got {tuple(pred_boxes.shape)}, {tuple(gt_boxes.shape)}"
        )
    pred = pred_boxes.float()
    gt = gt_boxes.to(pred.device, torch.float32)
    giou, iou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(pred), gt)
    denom = num_boxes + eps
    losses = {
        "loss_bbox": (pred - box_xyxy_to_cxcywh(gt)).abs().sum() / denom,
        "loss_giou": _share(pred.shape[0], num_boxes) - giou.sum() / denom,
        "iou": iou.detach().sum() / denom,
        "giou": giou.detach().sum() / denom,
    }
    return losses, giou


def score_loss(
    pred_score: torch.Tensor, giou: torch.Tensor, num_boxes: float, *, eps: float = BOX_EPS
) -> torch.Tensor:
    """IoU-aware score: `Σ (sigmoid(s) * 2 - 1 - giou.detach())^2 / (num_boxes + eps)`.

    Args:
        pred_score (`torch.Tensor` of shape `(N, 1)` or `(N,)`): score logits.
        giou (`torch.Tensor` of shape `(N,)`): GIoU of each matched box (detached here).
        num_boxes (`float`): normalising object count.
    Returns:
        `torch.Tensor` of shape `()`.
    """
    score = pred_score.float().reshape(-1)
    if score.shape != giou.shape:
        raise ValueError(f"pred_score has {score.numel()} entries for {giou.numel()} boxes")
    return ((score.sigmoid() * 2 - 1 - giou.detach().float()) ** 2).sum() / (num_boxes + eps)


# ---------------------------------------------------------------------------------------------------- masks
def _check_mask_args(inputs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> None:
    if inputs.dim() < 2 or inputs.shape != targets.shape or inputs.shape != valid.shape:
        raise ValueError(
            f"inputs, targets and valid must share a shape (N, H, W); got {tuple(inputs.shape)}, "
            f"{tuple(targets.shape)}, {tuple(valid.shape)}"
        )


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss on each object's valid region: `Σ_i [1 - (2 Σ p t + 1) / (Σ p + Σ t + 1)] / num_masks`.

    p = sigmoid(logit) and t are multiplied by `valid` first; an object without valid pixels contributes 0.

    Args:
        inputs (`torch.Tensor` of shape `(N, H, W)`): mask logits.
        targets (`torch.Tensor` of shape `(N, H, W)`): binary ground truth.
        valid (`torch.Tensor` of shape `(N, H, W)`): 1 where the ground truth is defined.
        num_masks (`float`): the complete denominator (the criterion passes `num_masks + 1e-5 * num_boxes`).
    Returns:
        `torch.Tensor` of shape `()`.
    """
    _check_mask_args(inputs, targets, valid)
    v = valid.flatten(1).float()
    p = inputs.flatten(1).float().sigmoid() * v
    t = targets.flatten(1).float() * v
    per_object = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return per_object.sum() / num_masks


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    num_masks: float,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet, https://arxiv.org/abs/1708.02002): mean over each object's valid pixels, summed
    over objects, divided by `num_masks`.

    Per pixel: `alpha_t * (1 - p_t)^gamma * BCE(logit, t)` with `p_t = p t + (1 - p)(1 - t)`,
    `alpha_t = alpha t + (1 - alpha)(1 - t)` (no alpha weighting when `alpha < 0`).

    Args:
        inputs, targets, valid (`torch.Tensor` of shape `(N, H, W)`): logits, binary targets, validity.
        num_masks (`float`): the complete denominator.
    Returns:
        `torch.Tensor` of shape `()`.
    """
    _check_mask_args(inputs, targets, valid)
    x = inputs.flatten(1).float()
    t = targets.flatten(1).float()
    v = valid.flatten(1).float()
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    per_object = (loss * v).sum(1) / v.sum(1).clamp(min=1)
    return per_object.sum() / num_masks


def pad_gt_masks(
    masks: Sequence[torch.Tensor | None],
    pred_shape: tuple[int, int],
    expected_hw: Sequence[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place each object's ground-truth mask top-left in a zero frame shaped like the prediction.

    Args:
        masks: per object, a `(h_i, w_i)` {0, 1} tensor, or None (no mask: the object is left out of the mask loss).
        pred_shape: `(H, W)` of the predicted masks (`4 * H_max, 4 * W_max` of the batch's images).
        expected_hw: per object, the `(h_i, w_i)` its image's prediction covers (`4 * grid_h, 4 * grid_w`); a gt mask
            of another size raises `ValueError`.
    Returns:
        `(targets, valid)`, both float32 `(N, H, W)`; `valid` is 1 on each present mask's region.
    """
    height, width = pred_shape
    targets = torch.zeros(len(masks), height, width)
    valid = torch.zeros(len(masks), height, width)
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        if mask.dim() != 2:
            raise ValueError(f"gt mask {i} must be 2-D (h, w), got shape {tuple(mask.shape)}")
        h, w = mask.shape
        if expected_hw is not None and (h, w) != tuple(expected_hw[i]):
            raise ValueError(
                f"gt mask {i} has shape {(h, w)} but the prediction for its image covers {tuple(expected_hw[i])} "
                "(mask_upscale x the image's patch grid)"
            )
        if h > height or w > width:
            raise ValueError(f"gt mask {i} of shape {(h, w)} does not fit the predicted {(height, width)}")
        targets[i, :h, :w] = mask.float()
        valid[i, :h, :w] = 1
    return targets, valid
