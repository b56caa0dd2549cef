"""Our training loss reproduces the authors' `PaDTSFTTrainer.compute_loss` on the reference batch (oracle README (d)).

The batch is built by hand from the recorded tensors in the collator's format: the oracle's inputs, its VRT picks (the
completion ids), its robust mask (`loss.robust_vrt_mask` columns V:), its ground-truth boxes (recorded in bf16 as the
authors' trainer cast them; fed here as those bf16 values in float32, while our library keeps fp32 boxes) and its gt
masks (each object's valid region cropped from `gt_mask`; the object without an rle has mask None).

Tolerances (README): rtol 1e-5 on totals and metrics; 1e-4 on dice, focal, decoder outputs and gradient norms. The
gradient-norm check adds atol 1e-6: the attention key biases have mathematically zero gradient (softmax ignores a
constant shift of the keys), so both runs hold only rounding noise of ~1e-8 there.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ORACLE_DIR, close

from padt import PaDTForConditionalGeneration
from padt.train.criterion import PaDTCriterion
from padt.train.step import compute_padt_loss, object_features

PROMPT_LENGTH = 64
VARIANTS = (("main", False), ("warmup", True))  # main: hidden-state features; warmup: prototypes of the VRT cells
METRICS = ("sft_loss", "bbox_loss", "score_loss", "mask_loss", "iou", "giou")


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((ORACLE_DIR / "io.json").read_text())


@pytest.fixture(scope="module")
def train_model():
    """A private copy (the tests call backward; the session-wide oracle model stays untouched)."""
    return PaDTForConditionalGeneration.from_pretrained(str(ORACLE_DIR / "model"), dtype=torch.float32)


def _vrt_base(meta: dict) -> int:
    return int(meta["scalars"]["vocab_size"])


def _objects(io: dict, variant: str, V: int) -> list[list[dict]]:
    """Objects of the reference batch in text order: consecutive VRT tokens of a row form one object."""
    completion = io["inputs.input_ids"][:, PROMPT_LENGTH:]
    robust = io["loss.robust_vrt_mask"][:, V:]
    boxes = io[f"loss.{variant}.gt_bboxes"].float()  # the trainer's bf16 values
    gt_mask, gt_valid = io[f"loss.{variant}.gt_mask"], io[f"loss.{variant}.gt_mask_valid"]
    objects, k, j = [], 0, 0
    for b in range(completion.shape[0]):
        runs: list[list[int]] = []
        for t in (completion[b] >= V).nonzero().flatten().tolist():
            if runs and runs[-1][-1] == t - 1:
                runs[-1].append(t)
            else:
                runs.append([t])
        row = []
        for run in runs:
            cells = [int(completion[b, t]) - V for t in run]
            fg = set(cells)
            for _ in run:
                fg |= set(robust[j].nonzero().flatten().tolist())
                j += 1
            valid = gt_valid[k].bool()
            mask = None
            if valid.any():
                h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
                assert bool(valid[:h, :w].all())  # the valid region is the top-left block
                mask = gt_mask[k, :h, :w].clone()
            row.append(
                {
                    "vrt_positions": run,
                    "vrt_cells": cells,
                    "fg_cells": sorted(fg),
                    "box_xyxy": boxes[k],
                    "mask": mask,
                    "label": "",
                    "task": "ovd",
                }
            )
            k += 1
        objects.append(row)
    assert k == boxes.shape[0] and j == robust.shape[0]
    return objects


def _batch(io: dict, variant: str, V: int) -> dict:
    ids = io["inputs.input_ids"]
    completion = ids[:, PROMPT_LENGTH:]
    objects = _objects(io, variant, V)
    return {
        "input_ids": ids,
        "attention_mask": io["inputs.attention_mask"],
        "mm_token_type_ids": (ids == 268).int(),  # <|image_pad|> of the reference tokenizer
        "pixel_values": io["inputs.pixel_values"],
        "image_grid_thw": io["inputs.image_grid_thw"],
        "image_sample_idx": torch.arange(ids.shape[0]),
        "prompt_length": PROMPT_LENGTH,
        "completion_mask": io["inputs.completion_mask"],
        "vrt_rows": (completion >= V).nonzero(),
        "robust_cell_mask": io["loss.robust_vrt_mask"][:, V:],
        "objects": objects,
        "num_objects": sum(len(o) for o in objects),
        "num_tokens": int(io["inputs.attention_mask"].sum()),
    }


def _rel_close(got: float, ref: float, rtol: float, name: str) -> None:
    assert abs(got - ref) <= rtol * abs(ref), f"{name}: got {got!r}, reference {ref!r}"


def test_batch_matches_recorded_vrt_picks(oracle_io, meta):
    V = _vrt_base(meta)
    batch = _batch(oracle_io, "main", V)
    assert batch["vrt_rows"].shape == (15, 2) and batch["num_objects"] == 3
    picks = [o["vrt_cells"] for objs in batch["objects"] for o in objs]
    assert picks == [[5, 5, 4, 1, 0], [11, 6, 7, 3, 2], [15, 16, 16, 17, 16]]  # global ids (img1 offset 12)
    assert [o["mask"] is None for objs in batch["objects"] for o in objs] == [False, True, False]


@pytest.mark.parametrize("variant,use_prototypes", VARIANTS)
def test_loss_reproduces_authors(train_model, oracle_io, meta, variant, use_prototypes):
    V = _vrt_base(meta)
    batch = _batch(oracle_io, variant, V)
    train_model.zero_grad(set_to_none=True)
    crit = PaDTCriterion()
    loss, logs = compute_padt_loss(train_model, batch, criterion=crit, use_prototype_features=use_prototypes)

    _rel_close(loss.item(), oracle_io[f"loss.{variant}.total"].item(), 1e-5, "total")
    for name in METRICS:
        _rel_close(logs[name].item(), meta["scalars"][f"loss.{variant}.metric.{name}"][0], 1e-5, name)
    _rel_close(logs["loss_dice"].item(), oracle_io[f"loss.{variant}.dice"].item(), 1e-4, "dice")
    _rel_close(logs["loss_mask"].item(), oracle_io[f"loss.{variant}.focal"].item(), 1e-4, "focal")
    # aggregates are the sums of our separately logged terms
    _rel_close(logs["bbox_loss"].item(), (logs["loss_giou"] + logs["loss_bbox"]).item(), 1e-6, "bbox = giou + l1")
    _rel_close(logs["mask_loss"].item(), (logs["loss_dice"] + logs["loss_mask"]).item(), 1e-6, "mask = dice + focal")

    if variant == "main":
        loss.backward()
        params = dict(train_model.named_parameters())

        def ours(name: str) -> str:
            if name.startswith("model."):
                return "model.language_model." + name[len("model.") :]
            return "model." + name if name.startswith("visual.") else name

        names = meta["lists"]["grad_names"]
        assert len(names) == len(params)
        got = torch.tensor([params[ours(n)].grad.norm().item() for n in names], dtype=torch.float64)
        close(got, oracle_io["loss.main.grad_norm"], 1e-6, 1e-4)
        for key in [k for k in oracle_io if k.startswith("loss.main.grad.")]:
            name = key[len("loss.main.grad.") :]
            ref = oracle_io[key]
            close(params[ours(name)].grad, ref, 1e-4 * float(ref.abs().max()), 1e-4)


@pytest.mark.parametrize("variant,use_prototypes", VARIANTS)
def test_decoder_features_and_predictions(train_model, oracle_io, meta, variant, use_prototypes):
    """The pieces compute_padt_loss uses: features fed to the decoder and its predictions."""
    V = _vrt_base(meta)
    batch = _batch(oracle_io, variant, V)
    with torch.no_grad():
        out = train_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            logits_to_keep=batch["input_ids"].shape[1] - PROMPT_LENGTH + 1,
            use_cache=False,
        )
        state = out.padt_state
        feats = object_features(
            batch["objects"],
            hidden=out.last_hidden_state,
            prototypes=state.prototypes,
            prompt_length=PROMPT_LENGTH,
            use_prototype_features=use_prototypes,
        )
        for b, objs in enumerate(feats):
            for o, f in enumerate(objs):
                close(f, oracle_io[f"loss.{variant}.decoder_feats.s{b}.o{o}"], 1e-4, 1e-4)
        dec = train_model.vl_decode(
            feats,
            state.prototypes,
            state.high_res_embeds,
            state.image_grid_thw,
            state.pos_embeds,
            dummy_when_empty=True,
        )
    close(dec["pred_boxes"], oracle_io[f"loss.{variant}.pred_boxes"], 1e-5, 1e-4)
    close(dec["pred_score"], oracle_io[f"loss.{variant}.pred_score"], 1e-5, 1e-4)
    close(dec["pred_mask"], oracle_io[f"loss.{variant}.pred_mask"], 1e-4, 1e-4)


def test_non_robust_ce_differs(train_model, oracle_io, meta):
    """The robust mask matters on this batch: without it the CE is higher (other fg cells compete with the target)."""
    V = _vrt_base(meta)
    batch = _batch(oracle_io, "main", V)
    with torch.no_grad():
        _, robust = compute_padt_loss(train_model, batch, criterion=PaDTCriterion(), use_prototype_features=False)
        _, plain = compute_padt_loss(
            train_model, batch, criterion=PaDTCriterion(robust=False), use_prototype_features=False
        )
    assert plain["sft_loss"].item() > robust["sft_loss"].item() + 1e-3
    assert plain["bbox_loss"].item() == robust["bbox_loss"].item()
