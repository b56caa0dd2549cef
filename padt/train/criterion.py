"""`PaDTCriterion`: runs PaDT's loss terms (`padt.train.losses`) and any auxiliary ones, and weighs them.

Where it sits: `padt.train.run` -> `padt.train.build` -> `PaDTTrainer.compute_loss` -> `padt.train.step` (one batch:
forward, decoder) -> this criterion -> `padt.train.losses`. As in DETR's `SetCriterion`, every ``loss_*`` method
returns a dict of named, unweighted terms, and `weight_dict` weighs them in `weighted_total`; every term, auxiliary
ones included (`padt.train.auxiliary`), has a `weight_dict` entry, and nothing is added beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from padt.geometry.boxes import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from padt.train.auxiliary import AuxiliaryLoss, loss_key
from padt.train.losses import (
    MASK_EPS_PER_BOX,
    box_losses,
    dice_loss,
    robust_vrt_cross_entropy,
    score_loss,
    sigmoid_focal_loss,
)

__all__ = ["BOX_LOSS_KEYS", "DECODER_LOSS_KEYS", "MASK_LOSS_KEYS", "SCORE_LOSS_KEYS", "PaDTCriterion"]

BOX_LOSS_KEYS = ("loss_bbox", "loss_giou")
SCORE_LOSS_KEYS = ("loss_score",)
MASK_LOSS_KEYS = ("loss_dice", "loss_mask")
DECODER_LOSS_KEYS = BOX_LOSS_KEYS + SCORE_LOSS_KEYS + MASK_LOSS_KEYS


def _distributed_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over ranks of each value when torch.distributed is initialised, else the values unchanged."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return (t / torch.distributed.get_world_size()).tolist()


class PaDTCriterion(nn.Module):
    """PaDT's losses, DETR-style: each ``loss_*`` method returns a dict of named unweighted terms; `weighted_total`
    weighs them with `weight_dict`.

    Normalisers. In a single process they are the authors': `N + 1e-4` for boxes and scores (N objects in the
    batch) and `M + 1e-5 N` for masks (M objects with a mask). When `torch.distributed` is initialised, N and M are
    all-reduced and divided by the world size (DETR), so every rank divides by the same mean count and the
    gradient average that DDP/ZeRO takes equals the loss over the global batch. The epsilons stay (no `clamp(min=1)`
    is needed for boxes: a rank without objects has a zero numerator); the mask denominator falls back to 1 only when
    it would be 0 (no object anywhere), where its numerator is 0 too. The CE is per-sample, needing no all-reduce.

    Args:
        weight_dict (`Mapping[str, float]`, *optional*): weight of each enabled loss key (missing keys weigh 1;
            keys of disabled or unknown losses raise `ValueError`). Keys: `loss_ce`, `loss_bbox`, `loss_giou`,
            `loss_score`, `loss_dice`, `loss_mask`, and ``loss_<name>`` of each auxiliary loss.
        use_bbox_loss, use_score_loss, use_mask_loss (`bool`): switch the decoder losses (paper ablations).
        robust (`bool`): apply the robust VRT mask in the CE (False: plain CE at VRT targets; ablation).
        focal_alpha, focal_gamma (`float`): focal loss parameters (0.25, 2).
        auxiliary_losses (`Sequence[AuxiliaryLoss]`, *optional*): extra terms run by `loss_auxiliary` (e.g. the
            shapes benchmark's cell-class loss; `padt.train.auxiliary`), distinct names.
    """

    def __init__(
        self,
        weight_dict: Mapping[str, float] | None = None,
        *,
        use_bbox_loss: bool = True,
        use_score_loss: bool = True,
        use_mask_loss: bool = True,
        robust: bool = True,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        auxiliary_losses: Sequence[AuxiliaryLoss] = (),
    ) -> None:
        super().__init__()
        self.auxiliary_losses = tuple(auxiliary_losses)
        names = [aux.name for aux in self.auxiliary_losses]
        builtin = ("loss_ce",) + DECODER_LOSS_KEYS
        clash = sorted({n for n in names if names.count(n) > 1 or loss_key(n) in builtin})
        if clash:
            raise ValueError(f"auxiliary loss names {clash} repeat or name a PaDT loss ({list(builtin)})")
        self.use_bbox_loss = bool(use_bbox_loss)
        self.use_score_loss = bool(use_score_loss)
        self.use_mask_loss = bool(use_mask_loss)
        self.robust = bool(robust)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        keys = self.loss_keys
        given = dict(weight_dict or {})
        unknown = sorted(set(given) - set(keys))
        if unknown:
            raise ValueError(
                f"weight_dict has keys {unknown} that are not enabled losses; enabled: {list(keys)} (a disabled "
                "decoder loss takes no weight)"
            )
        self.weight_dict = {k: float(given.get(k, 1.0)) for k in keys}

    @property
    def uses_decoder(self) -> bool:
        return self.use_bbox_loss or self.use_score_loss or self.use_mask_loss

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """Keys of the losses this criterion computes (= the keys of `weight_dict`)."""
        keys = ("loss_ce",)
        keys += BOX_LOSS_KEYS if self.use_bbox_loss else ()
        keys += SCORE_LOSS_KEYS if self.use_score_loss else ()
        keys += MASK_LOSS_KEYS if self.use_mask_loss else ()
        return keys + tuple(loss_key(aux.name) for aux in self.auxiliary_losses)

    def extra_repr(self) -> str:
        names = [aux.name for aux in self.auxiliary_losses]
        return f"weight_dict={self.weight_dict}, robust={self.robust}" + (f", auxiliary={names}" if names else "")

    # ------------------------------------------------------------------ normalisers
    def normalisers(self, num_boxes: int, num_masks: int, device: torch.device) -> tuple[float, float]:
        """`(box_count, mask_denominator)`: the (all-reduced mean) object count and `M + 1e-5 N` (see class doc).

        Every rank must call this every step (it all-reduces when distributed), whether it has objects or not.
        """
        n, m = _distributed_mean([float(num_boxes), float(num_masks)], device)
        mask_denominator = m + MASK_EPS_PER_BOX * n
        return n, (mask_denominator if mask_denominator > 0 else 1.0)

    # ------------------------------------------------------------------ losses
    def loss_ce(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        completion_mask: torch.Tensor,
        vrt_rows: torch.Tensor | None = None,
        robust_cell_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`{"loss_ce"}`: `robust_vrt_cross_entropy` (robust mask ignored when `robust=False`). Shapes as there."""
        if not self.robust:
            vrt_rows = robust_cell_mask = None
        return {"loss_ce": robust_vrt_cross_entropy(logits, targets, completion_mask, vrt_rows, robust_cell_mask)}

    def loss_boxes(self, outputs: Mapping, targets: Mapping, num_boxes: float) -> dict[str, torch.Tensor]:
        """`{"loss_bbox", "loss_giou", "iou", "giou"}` from `outputs["pred_boxes"] (N, 4)` cxcywh and
        `targets["boxes"] (N, 4)` xyxy, matched by order."""
        losses, _ = box_losses(outputs["pred_boxes"], targets["boxes"], num_boxes)
        return losses

    def loss_score(self, outputs: Mapping, targets: Mapping, num_boxes: float) -> dict[str, torch.Tensor]:
        """`{"loss_score"}` from `outputs["pred_score"] (N, 1)` against the detached GIoU of the matched boxes."""
        pred = box_cxcywh_to_xyxy(outputs["pred_boxes"].float())
        giou, _ = elementwise_generalized_box_iou(pred.detach(), targets["boxes"].to(pred.device, torch.float32))
        return {"loss_score": score_loss(outputs["pred_score"], giou, num_boxes)}

    def loss_masks(self, outputs: Mapping, targets: Mapping, num_masks: float) -> dict[str, torch.Tensor]:
        """`{"loss_dice", "loss_mask"}` (focal) from `outputs["pred_mask"] (N, H, W)` logits and `targets["masks"]`,
        `targets["mask_valid"]` `(N, H, W)` (see `pad_gt_masks`)."""
        pred = outputs["pred_mask"]
        if pred is None:
            raise ValueError("use_mask_loss=True but the decoder returned no masks (its mask head is off)")
        gt = targets["masks"].to(pred.device)
        valid = targets["mask_valid"].to(pred.device)
        return {
            "loss_dice": dice_loss(pred, gt, valid, num_masks),
            "loss_mask": sigmoid_focal_loss(
                pred, gt, valid, num_masks, alpha=self.focal_alpha, gamma=self.focal_gamma
            ),
        }

    def loss_auxiliary(self, model: nn.Module, batch: Mapping[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        """``{"loss_<name>": loss, **logs}`` of every auxiliary loss (`padt.train.auxiliary.AuxiliaryLoss`: arguments
        as there), unweighted; empty without auxiliary losses."""
        losses: dict[str, torch.Tensor] = {}
        for aux in self.auxiliary_losses:
            loss, logs = aux(model, batch, outputs)
            bad = sorted(k for k in logs if k.startswith("loss_") or k in self.weight_dict)
            if bad:
                raise ValueError(f"auxiliary loss {aux.name!r} logs {bad}: metric names must not start with 'loss_'")
            losses[loss_key(aux.name)] = loss
            losses.update(logs)
        return losses

    def forward(
        self, outputs: Mapping, targets: Mapping, *, num_boxes: float, num_masks: float
    ) -> dict[str, torch.Tensor]:
        """All enabled decoder losses and metrics (the CE comes from `loss_ce`).

        Args:
            outputs: `vl_decode`'s dict (`pred_boxes (N, 4)`, `pred_score (N, 1)`, `pred_mask (N, H, W)`).
            targets: `boxes (N, 4)` xyxy; with masks, `masks` and `mask_valid` `(N, H, W)`.
            num_boxes, num_masks: from `normalisers`.
        """
        losses: dict[str, torch.Tensor] = {}
        if self.use_bbox_loss:
            losses.update(self.loss_boxes(outputs, targets, num_boxes))
        if self.use_score_loss:
            losses.update(self.loss_score(outputs, targets, num_boxes))
        if self.use_mask_loss:
            losses.update(self.loss_masks(outputs, targets, num_masks))
        return losses

    # ------------------------------------------------------------------ weighting
    def weighted_total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`Σ_k weight_dict[k] * losses[k]` over the enabled loss keys, auxiliary ones included (metrics are not
        summed)."""
        missing = [k for k in self.weight_dict if k not in losses]
        if missing:
            raise ValueError(f"losses lack {missing}; every enabled loss must be computed before weighting")
        return sum(w * losses[k] for k, w in self.weight_dict.items())
