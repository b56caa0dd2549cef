"""PaDT losses by value and behaviour, and `compute_padt_loss` on a tiny random model (batches built by hand in the
collator's format)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from padt.train.criterion import PaDTCriterion
from padt.train.losses import (
    box_losses,
    dice_loss,
    pad_gt_masks,
    robust_vrt_cross_entropy,
    score_loss,
    sigmoid_focal_loss,
)
from padt.train.step import compute_padt_loss

# ---------------------------------------------------------------------------------------------------- CE


def test_ce_known_value_uniform_logits():
    """Uniform logits over K classes: nll = log K per token; per sample Σ / (n + 1e-4), then the batch mean."""
    K = 7
    logits = torch.zeros(2, 4, K)
    targets = torch.randint(0, K, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    got = robust_vrt_cross_entropy(logits, targets, mask)
    want = (3 * math.log(K) / (3 + 1e-4) + math.log(K) / (1 + 1e-4)) / 2
    assert got.dtype == torch.float32 and abs(got.item() - want) < 1e-6


def test_ce_equals_torch_cross_entropy_without_robust_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    ref = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="none").view(3, 5).sum(1) / (5 + 1e-4)
    assert torch.allclose(robust_vrt_cross_entropy(logits, targets, mask), ref.mean(), atol=1e-6)


def test_ce_ignores_pad_positions_even_with_inf_logits():
    logits = torch.zeros(1, 3, 4)
    logits[0, 2] = float("-inf")  # a pad position whose target cannot be reached: must not produce inf/NaN
    targets = torch.tensor([[0, 1, 2]])
    got = robust_vrt_cross_entropy(logits, targets, torch.tensor([[1, 1, 0]]))
    assert torch.isfinite(got) and abs(got.item() - 2 * math.log(4) / (2 + 1e-4)) < 1e-6


def test_robust_mask_raises_target_probability_by_hand():
    """V = 4 text ids + 3 cells. Target cell 0 at (0, 1); cells 1 and 2 are the same object's other fg cells."""
    V, N = 4, 3
    logits = torch.tensor([[[0.0] * (V + N), [0.5, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0]]])
    targets = torch.tensor([[1, V + 0]])
    mask = torch.ones(1, 2, dtype=torch.long)
    rows = torch.tensor([[0, 1]])
    robust = torch.tensor([[False, True, True]])
    plain = robust_vrt_cross_entropy(logits, targets, mask)
    masked = robust_vrt_cross_entropy(logits, targets, mask, rows, robust)
    row = logits[0, 1]
    nll_plain = -(row[V] - torch.logsumexp(row, 0))
    nll_masked = -(row[V] - torch.logsumexp(row[: V + 1], 0))  # cells 1, 2 removed from the softmax
    first = math.log(V + N)
    assert abs(plain.item() - (first + nll_plain.item()) / (2 + 1e-4)) < 1e-6
    assert abs(masked.item() - (first + nll_masked.item()) / (2 + 1e-4)) < 1e-6
    assert masked < plain  # the target's probability went up


def test_robust_mask_validation():
    logits, targets, mask = torch.zeros(1, 2, 6), torch.tensor([[1, 4]]), torch.tensor([[1, 0]])
    with pytest.raises(ValueError, match="not a completion position"):
        robust_vrt_cross_entropy(logits, targets, mask, torch.tensor([[0, 1]]), torch.tensor([[False, True]]))
    with pytest.raises(ValueError, match="hides the target"):
        robust_vrt_cross_entropy(
            logits,
            torch.tensor([[4, 1]]),
            torch.tensor([[1, 1]]),
            torch.tensor([[0, 0]]),
            torch.tensor([[True, False]]),
        )
    with pytest.raises(ValueError, match="not a VRT"):
        robust_vrt_cross_entropy(logits, targets, mask, torch.tensor([[0, 0]]), torch.tensor([[False, True]]))
    with pytest.raises(ValueError, match="vrt_rows"):
        robust_vrt_cross_entropy(logits, targets, mask, None, torch.tensor([[False, True]]))


def test_ce_fp32_from_bf16_logits():
    g = torch.Generator().manual_seed(0)
    logits32 = torch.randn(2, 6, 300, generator=g) * 4
    logits = logits32.bfloat16().requires_grad_()
    targets = torch.randint(0, 300, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    got = robust_vrt_cross_entropy(logits, targets, mask)
    assert got.dtype == torch.float32
    # exactly the fp32 computation on the bf16 values (not a bf16 softmax)
    assert torch.equal(got, robust_vrt_cross_entropy(logits.detach().float(), targets, mask))
    got.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


# ---------------------------------------------------------------------------------------------------- boxes, score


def test_box_losses_zero_when_pred_equals_target():
    gt = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]])
    pred = torch.stack(
        [(gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2, gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]], 1
    )
    losses, giou = box_losses(pred, gt, num_boxes=2.0)
    assert losses["loss_bbox"].item() < 1e-6
    assert abs(losses["loss_giou"].item()) < 1e-4  # 1 - N / (N + 1e-4): the authors' epsilon
    assert torch.allclose(giou, torch.ones(2))
    assert abs(score_loss(torch.full((2, 1), 1e4), giou, 2.0).item()) < 1e-6  # sigmoid*2-1 == 1 == giou


def test_box_losses_known_values():
    gt = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    pred = torch.tensor([[0.5, 0.25, 0.5, 0.5]])  # xyxy (0.25, 0, 0.75, 0.5): half overlaps gt
    losses, giou = box_losses(pred, gt, num_boxes=1.0)
    iou = 0.125 / 0.375  # inter 0.5*0.25, union 2*0.25 - 0.125
    g = iou - (0.375 - 0.375) / 0.375  # enclosing box 0.75 x 0.5 = 0.375 = union
    d = 1 + 1e-4
    assert abs(losses["iou"].item() - iou / d) < 1e-6 and abs(losses["giou"].item() - g / d) < 1e-6
    assert abs(losses["loss_giou"].item() - (1 - g / d)) < 1e-6
    assert abs(losses["loss_bbox"].item() - 0.25 / d) < 1e-6  # |0.5 - 0.25| on cx only
    # score: logit 0 -> sigmoid*2-1 = 0, so (0 - giou)^2
    assert abs(score_loss(torch.zeros(1, 1), giou, 1.0).item() - g**2 / d) < 1e-6


def test_score_loss_does_not_train_the_boxes():
    pred = torch.tensor([[0.5, 0.25, 0.5, 0.5]], requires_grad=True)
    score = torch.zeros(1, 1, requires_grad=True)
    _, giou = box_losses(pred, torch.tensor([[0.0, 0.0, 0.5, 0.5]]), 1.0)
    score_loss(score, giou, 1.0).backward()
    assert pred.grad is None and score.grad.abs().item() > 0


# ---------------------------------------------------------------------------------------------------- masks


def test_mask_losses_near_zero_when_pred_equals_target():
    t = (torch.rand(2, 8, 8) > 0.5).float()
    logits = (t * 2 - 1) * 30
    v = torch.ones_like(t)
    assert dice_loss(logits, t, v, 2.0).item() < 1e-6
    assert sigmoid_focal_loss(logits, t, v, 2.0).item() < 1e-10


def test_mask_losses_known_values_and_valid_region():
    t = torch.zeros(1, 4, 4)
    t[0, :2] = 1  # 8 foreground pixels of 16
    x = torch.zeros(1, 4, 4)  # p = 0.5 everywhere
    v = torch.ones(1, 4, 4)
    dice = 1 - (2 * 0.5 * 8 + 1) / (0.5 * 16 + 8 + 1)
    assert abs(dice_loss(x, t, v, 1.0).item() - dice) < 1e-6
    # focal at p = 0.5: ce = log 2, (1 - p_t)^2 = 1/4, alpha_t = .25 on fg and .75 on bg -> mean .5 * log2 / 4
    focal = (0.25 + 0.75) / 2 * math.log(2) / 4
    assert abs(sigmoid_focal_loss(x, t, v, 1.0).item() - focal) < 1e-6
    # pixels outside the valid region do not count, whatever their logits
    big_t, big_x, big_v = torch.zeros(1, 6, 6), torch.full((1, 6, 6), 50.0), torch.zeros(1, 6, 6)
    big_t[:, :4, :4], big_x[:, :4, :4], big_v[:, :4, :4] = t, x, 1
    assert abs(dice_loss(big_x, big_t, big_v, 1.0).item() - dice) < 1e-6
    assert abs(sigmoid_focal_loss(big_x, big_t, big_v, 1.0).item() - focal) < 1e-6


def test_object_without_mask_contributes_nothing():
    gt, valid = pad_gt_masks([torch.ones(2, 3), None], (4, 4), [(2, 3), (4, 4)])
    assert valid[0].sum() == 6 and valid[1].sum() == 0 and gt[0, :2, :3].eq(1).all()
    x = torch.randn(2, 4, 4)
    one = dice_loss(x[:1], gt[:1], valid[:1], 1.0)
    assert torch.allclose(dice_loss(x, gt, valid, 1.0), one)
    assert torch.allclose(sigmoid_focal_loss(x, gt, valid, 1.0), sigmoid_focal_loss(x[:1], gt[:1], valid[:1], 1.0))
    with pytest.raises(ValueError, match="covers"):
        pad_gt_masks([torch.ones(2, 2)], (4, 4), [(2, 3)])


# ---------------------------------------------------------------------------------------------------- criterion


def test_weight_dict_keys_equal_loss_keys():
    full = PaDTCriterion()
    assert set(full.weight_dict) == {"loss_ce", "loss_bbox", "loss_giou", "loss_score", "loss_dice", "loss_mask"}
    outputs = {
        "pred_boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
        "pred_score": torch.zeros(1, 1),
        "pred_mask": torch.zeros(1, 4, 4),
    }
    gt, valid = pad_gt_masks([torch.ones(4, 4)], (4, 4))
    targets = {"boxes": torch.tensor([[0.4, 0.4, 0.6, 0.7]]), "masks": gt, "mask_valid": valid}
    for crit in (full, PaDTCriterion(use_mask_loss=False), PaDTCriterion(use_bbox_loss=False, use_score_loss=False)):
        losses = crit(outputs, targets, num_boxes=1.0, num_masks=1.0)
        losses.update(crit.loss_ce(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)))
        assert {k for k in losses if k.startswith("loss_")} == set(crit.weight_dict) == set(crit.loss_keys)
    weighted = PaDTCriterion({"loss_ce": 2.0, "loss_mask": 0.5})
    losses = weighted(outputs, targets, num_boxes=1.0, num_masks=1.0)
    losses["loss_ce"] = torch.tensor(1.0)
    want = 2.0 + sum(v for k, v in losses.items() if k in ("loss_bbox", "loss_giou", "loss_score", "loss_dice"))
    want = want + 0.5 * losses["loss_mask"]
    assert torch.allclose(weighted.weighted_total(losses), want)
    with pytest.raises(ValueError, match="loss_dice"):
        PaDTCriterion({"loss_dice": 1.0}, use_mask_loss=False)
    with pytest.raises(ValueError, match="loss_typo"):
        PaDTCriterion({"loss_typo": 1.0})


class _ConstantLoss:
    """A stand-in auxiliary loss (padt.train.auxiliary.AuxiliaryLoss): a fixed value and one metric."""

    name = "const"

    def __init__(self, value: float):
        self.value = value

    def __call__(self, model, batch, outputs):
        return torch.tensor(self.value), {"const_metric": torch.tensor(0.25)}


def test_auxiliary_losses_go_through_weight_dict():
    aux = _ConstantLoss(2.0)
    crit = PaDTCriterion({"loss_ce": 1.0, "loss_const": 0.5}, use_bbox_loss=False, use_score_loss=False,
                         use_mask_loss=False, auxiliary_losses=[aux])
    assert crit.loss_keys == ("loss_ce", "loss_const") and crit.weight_dict == {"loss_ce": 1.0, "loss_const": 0.5}
    losses = {"loss_ce": torch.tensor(1.0), **crit.loss_auxiliary(None, {}, None)}
    assert set(losses) == {"loss_ce", "loss_const", "const_metric"}  # the metric is logged, never weighed
    assert crit.weighted_total(losses).item() == pytest.approx(1.0 + 0.5 * 2.0)
    with pytest.raises(ValueError, match="loss_const"):  # computed but not run: the total refuses
        crit.weighted_total({"loss_ce": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="loss_const"):  # a weight without the loss
        PaDTCriterion({"loss_const": 1.0})
    with pytest.raises(ValueError, match="repeat or name a PaDT loss"):
        PaDTCriterion(auxiliary_losses=[aux, _ConstantLoss(1.0)])
    assert PaDTCriterion().loss_auxiliary(None, {}, None) == {}


def test_auxiliary_wiring_is_checked_against_the_arguments():
    from types import SimpleNamespace

    from padt.train.auxiliary import check_auxiliary_wiring

    check_auxiliary_wiring(SimpleNamespace(cell_class_loss_coef=1.0), ("loss_ce", "loss_cell_class"))
    check_auxiliary_wiring(SimpleNamespace(cell_class_loss_coef=0.0), ("loss_ce",))
    with pytest.raises(ValueError, match="has no loss_cell_class term"):
        check_auxiliary_wiring(SimpleNamespace(cell_class_loss_coef=1.0), ("loss_ce",))


def test_normalisers_single_process():
    crit = PaDTCriterion()
    assert crit.normalisers(3, 2, torch.device("cpu")) == (3.0, 2.0 + 3e-5)
    assert crit.normalisers(0, 0, torch.device("cpu")) == (0.0, 1.0)  # no objects anywhere: no 0/0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _normaliser_worker(rank: int, world: int, port: int, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        counts = [(3, 1), (0, 0)][rank]  # rank 1 has no objects at all
        queue.put((rank, PaDTCriterion().normalisers(*counts, torch.device("cpu"))))
    finally:
        torch.distributed.destroy_process_group()


def test_normalisers_are_all_reduced_across_ranks():
    ctx = torch.multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_normaliser_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # both ranks divide by the same mean counts: boxes (3 + 0) / 2, masks (1 + 0) / 2 + 1e-5 * boxes
    assert results[0] == results[1] == (1.5, 0.5 + 1.5e-5)


# ---------------------------------------------------------------------------------------------------- training step


def _tiny_batch(config, objects_per_sample: tuple[bool, ...] = (True, False), mask: bool = True) -> dict:
    """Two samples with image grids (4, 4) and (4, 6) patches (4 and 6 merged cells), in the collator's format: prompt
    left-padded, completion right-padded, global VRT ids. Where asked, a sample has one object with 3 VRTs: sample 0
    picks local cells 0, 1, 1 of foreground {0, 1, 3}; sample 1 picks 5, 4, 5 of {4, 5}."""
    V, merge = config.vrt_base_id, config.spatial_merge_size
    eos, pad = config.text_config.eos_token_id, config.text_config.pad_token_id
    grids = [(4, 4), (4, 6)]
    picks = [([0, 1, 1], [0, 1, 3]), ([5, 4, 5], [4, 5])]
    boxes = [torch.tensor([0.1, 0.2, 0.6, 0.7]), torch.tensor([0.3, 0.1, 0.9, 0.5])]
    g = torch.Generator().manual_seed(0)
    prompts, completions, objects, offset = [], [], [], 0
    for b, (h, w) in enumerate(grids):
        cells = h * w // merge**2
        prompts.append(
            [1, 2, config.vision_start_token_id]
            + [config.image_token_id] * cells
            + [config.vision_end_token_id, 3 + b]
        )
        if objects_per_sample[b]:
            vrt_cells = [offset + c for c in picks[b][0]]
            gt_mask = (torch.rand(4 * h, 4 * w, generator=g) > 0.5).float() if mask else None
            completions.append([10, 11] + [V + c for c in vrt_cells] + [12, eos])
            objects.append(
                [
                    {
                        "vrt_positions": [2, 3, 4],
                        "vrt_cells": vrt_cells,
                        "fg_cells": [offset + c for c in picks[b][1]],
                        "box_xyxy": boxes[b],
                        "mask": gt_mask,
                        "label": "x",
                        "task": "ovd",
                    }
                ]
            )
        else:
            completions.append([13, 14, eos])
            objects.append([])
        offset += cells
    P, C = max(map(len, prompts)), max(map(len, completions))
    input_ids = torch.tensor(
        [[pad] * (P - len(p)) + p + c + [pad] * (C - len(c)) for p, c in zip(prompts, completions)]
    )
    attention = torch.tensor(
        [[0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (C - len(c)) for p, c in zip(prompts, completions)]
    )
    vrt_rows = (input_ids[:, P:] >= V).nonzero()
    robust = torch.zeros(vrt_rows.shape[0], offset, dtype=torch.bool)
    j = 0
    for objs in objects:
        for obj in objs:
            for cell in obj["vrt_cells"]:
                robust[j, [c for c in obj["fg_cells"] if c != cell]] = True
                j += 1
    pixels = torch.randn(sum(h * w for h, w in grids), 3 * 2 * 14 * 14, generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mm_token_type_ids": (input_ids == config.image_token_id).int(),
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids]),
        "image_sample_idx": torch.arange(2),
        "prompt_length": P,
        "completion_mask": attention[:, P:],
        "vrt_rows": vrt_rows,
        "robust_cell_mask": robust,
        "objects": objects,
        "num_objects": sum(map(len, objects)),
        "num_tokens": int(attention.sum()),
    }


def _grads_reach(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.grad is None]


@pytest.mark.parametrize("objects_per_sample", [(True, True), (True, False), (False, False)])
def test_training_step_graph_and_logs(objects_per_sample):
    model = make_tiny_model().train()
    batch = _tiny_batch(model.config, objects_per_sample)
    loss, logs = compute_padt_loss(model, batch, criterion=PaDTCriterion(), use_prototype_features=False)
    assert torch.isfinite(loss)
    for key in (
        "loss_ce",
        "loss_bbox",
        "loss_giou",
        "loss_score",
        "loss_dice",
        "loss_mask",
        "iou",
        "giou",
        "sft_loss",
        "bbox_loss",
        "score_loss",
        "mask_loss",
        "loss",
    ):
        assert torch.isfinite(logs[key]), key
    if not any(objects_per_sample):
        for key in ("loss_bbox", "loss_giou", "loss_score", "loss_dice", "loss_mask"):
            assert logs[key].item() == 0.0, key
        assert abs(loss.item() - logs["loss_ce"].item()) < 1e-6
    loss.backward()
    assert _grads_reach(model.vl_decoder) == []  # every decoder parameter, also on a batch without objects
    assert _grads_reach(model.vis_proj) == [] and _grads_reach(model.vis_norm) == []


@pytest.mark.parametrize("switch", ["use_mask_loss", "use_score_loss", "use_bbox_loss"])
def test_disabled_decoder_loss_keeps_heads_in_graph(switch):
    model = make_tiny_model().train()
    crit = PaDTCriterion(**{switch: False})
    loss, logs = compute_padt_loss(model, _tiny_batch(model.config), criterion=crit, use_prototype_features=False)
    assert not set(logs) & {k for k in ("loss_dice", "loss_score", "loss_giou") if k not in crit.loss_keys}
    loss.backward()
    assert _grads_reach(model.vl_decoder) == []


def test_training_step_uses_completion_logits_only_and_matches_full_ce():
    model = make_tiny_model()
    batch = _tiny_batch(model.config, (True, True))
    seen = {}
    inner_forward = model.forward

    def spy(*args, **kwargs):
        out = inner_forward(*args, **kwargs)
        seen["logits_to_keep"], seen["logits_shape"] = kwargs.get("logits_to_keep"), tuple(out.logits.shape)
        return out

    model.forward = spy
    with torch.no_grad():
        _, logs = compute_padt_loss(model, batch, criterion=PaDTCriterion(robust=False), use_prototype_features=False)
    P, L = batch["prompt_length"], batch["input_ids"].shape[1]
    assert seen["logits_to_keep"] == L - P + 1 and seen["logits_shape"][1] == L - P + 1
    # reference: full-sequence logits, plain per-token CE on the completion
    with torch.no_grad():
        full = inner_forward(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        ).logits
    nll = F.cross_entropy(full[:, P - 1 : -1].float().transpose(1, 2), batch["input_ids"][:, P:], reduction="none")
    m = batch["completion_mask"].float()
    ref = ((nll * m).sum(1) / (m.sum(1) + 1e-4)).mean()
    assert abs(logs["loss_ce"].item() - ref.item()) < 1e-5


def test_warmup_features_are_prototypes_and_differ():
    model = make_tiny_model()
    batch = _tiny_batch(model.config, (True, True))
    with torch.no_grad():
        _, hidden = compute_padt_loss(model, batch, criterion=PaDTCriterion(), use_prototype_features=False)
        _, proto = compute_padt_loss(model, batch, criterion=PaDTCriterion(), use_prototype_features=True)
    assert hidden["loss_ce"].item() == proto["loss_ce"].item()
    assert hidden["loss_bbox"].item() != proto["loss_bbox"].item()


def test_training_step_rejects_inconsistent_objects():
    model = make_tiny_model()
    batch = _tiny_batch(model.config, (True, True))
    batch["objects"][0][0]["vrt_cells"] = [5, 5, 5]  # a cell of sample 1's image
    with pytest.raises(ValueError, match="expected one image of sample 0"):
        compute_padt_loss(model, batch, criterion=PaDTCriterion(), use_prototype_features=True)
