"""PaDTCollator: the training batch (padding, global VRT ids, targets, robust mask, gt masks) and the oracle's batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from padt.data import PaDTCollator, PaDTDataset, build_answer, robust_cell_mask
from padt.geometry.masks import rle_encode
from padt.processing import PaDTProcessor
from padt.testing.tokenizer import build_tiny_processor, build_tiny_tokenizer

pytest.importorskip("cv2")
ORACLE = Path(__file__).parent / "fixtures" / "oracle_ref"
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 256 * 28 * 28
BATCH_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "image_sample_idx",
              "prompt_length", "completion_mask", "vrt_rows", "robust_cell_mask", "objects", "num_objects",
              "num_tokens", "sample_index"}


@pytest.fixture(scope="module")
def proc() -> PaDTProcessor:
    tok = build_tiny_tokenizer()
    V = -(-len(tok) // 64) * 64  # embedding rows of the tiny model
    return PaDTProcessor(build_tiny_processor(tok, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS), V)


def _rect_rle(h: int, w: int, rows: slice, cols: slice) -> dict:
    mask = np.zeros((h, w), np.uint8)
    mask[rows, cols] = 1
    return rle_encode(mask)


def _image(w: int, h: int, color=(200, 40, 40)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def _examples() -> list[dict]:
    """Two items as PaDTDataset makes them: 112x84 px (3x4 cells) with 2 objects, 56x112 px (4x2 cells) with 1."""
    ex0 = {
        "image": _image(112, 84), "prompt": 'Find "red box" and "blue disk".', "task": "ovd", "index": 7,
        "answer_template": 'The "red box" <|Obj_0|> and the "blue disk" <|Obj_1|>.', "grid": (3, 4),
        "objects": [
            {"cells": [0, 1, 4, 5], "box": [0.0, 0.0, 0.5, 2 / 3], "rle": _rect_rle(84, 112, slice(0, 56), slice(0, 56)),
             "label": "red box"},
            {"cells": [2, 3, 6, 7, 10, 11], "box": [0.5, 0.0, 1.0, 1.0], "rle": None, "label": "blue disk"},
        ],
    }
    ex1 = {
        "image": _image(56, 112, (40, 200, 40)), "prompt": 'Where is "green bar"?', "task": "refering", "index": 3,
        "answer_template": 'Found "green bar" <|Obj_0|>.', "grid": (4, 2),
        "objects": [{"cells": [2, 3, 4, 5], "box": [0.0, 0.25, 1.0, 0.75],
                     "rle": _rect_rle(112, 56, slice(28, 84), slice(0, 56)), "label": "green bar"}],
    }
    return [ex0, ex1]


def _empty_example(index: int = 11) -> dict:
    return {"image": _image(84, 84, (90, 90, 90)), "prompt": 'Please detect: ["cat"].', "task": "ovd",
            "index": index, "answer_template": "No objects from the list are present in the image.", "objects": [],
            "grid": (3, 3)}


# --------------------------------------------------------------------------- layout
def test_batch_layout_padding_and_global_ids(proc):
    examples = _examples()
    batch = PaDTCollator(proc)(examples)
    assert set(batch) == BATCH_KEYS
    V, P = proc.vrt_base_id, batch["prompt_length"]
    B, L = batch["input_ids"].shape
    C = L - P
    assert B == 2 and batch["completion_mask"].shape == (2, C) and batch["attention_mask"].shape == (2, L)
    assert batch["image_grid_thw"].tolist() == [[1, 6, 8], [1, 8, 4]] and batch["image_sample_idx"].tolist() == [0, 1]
    assert batch["pixel_values"].shape[0] == 6 * 8 + 8 * 4
    assert batch["sample_index"].tolist() == [7, 3]
    prompt_mask, comp_mask = batch["attention_mask"][:, :P], batch["attention_mask"][:, P:]
    assert torch.equal(comp_mask, batch["completion_mask"])
    # prompts left-padded (row 1's prompt is shorter), completions right-padded
    for b in range(2):
        p, c = prompt_mask[b].tolist(), comp_mask[b].tolist()
        assert p == sorted(p) and c == sorted(c, reverse=True) and p[-1] == 1 and c[0] == 1
    assert prompt_mask[1].sum() < prompt_mask[0].sum()
    pad = proc.tokenizer.pad_token_id
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()
    # image tokens: 12 and 8 cells, marked in mm_token_type_ids
    image_pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == image_pad)
    assert (batch["input_ids"] == image_pad).sum(1).tolist() == [12, 8]
    # global VRT ids: row 0 -> cells [0, 12), row 1 -> cells [12, 20)
    comp = batch["input_ids"][:, P:]
    assert ((comp[0][comp[0] >= V] - V) < 12).all() and ((comp[1][comp[1] >= V] - V) >= 12).all()
    assert (comp >= V).sum(1).tolist() == [10, 5] and (batch["input_ids"][:, :P] < V).all()
    assert batch["num_objects"] == 3 and batch["num_tokens"] == int(batch["attention_mask"].sum())


def test_prompt_length_and_completion_mask_line_up(proc):
    examples = _examples()
    collator = PaDTCollator(proc, seed=5)
    batch = collator(examples)
    P = batch["prompt_length"]
    local = proc.codec.to_local(batch["input_ids"][:, P:], batch["image_grid_thw"], batch["image_sample_idx"])
    for b, ex in enumerate(examples):
        text = proc.decode(local[b][batch["completion_mask"][b] == 1])
        assert text == build_answer(ex["answer_template"], collator.sample_picks(ex)) + "<|im_end|>"
        prompt = proc.decode(batch["input_ids"][b, :P][batch["attention_mask"][b, :P] == 1])
        assert prompt.endswith(ex["prompt"] + "<|im_end|>\n<|im_start|>assistant\n")
        assert prompt.index("<|vision_start|>") < prompt.index(ex["prompt"])  # image before the text


# --------------------------------------------------------------------------- targets
def test_vrt_rows_objects_and_robust_rows(proc):
    examples = _examples()
    collator = PaDTCollator(proc)
    batch = collator(examples)
    V, P = proc.vrt_base_id, batch["prompt_length"]
    rows = batch["vrt_rows"]
    assert torch.equal(rows, (batch["input_ids"][:, P:] >= V).nonzero())
    keys = (rows[:, 0] * 10_000 + rows[:, 1]).tolist()
    assert keys == sorted(keys)  # row-major over (b, t)
    offsets = [0, 12]
    j = 0
    robust = batch["robust_cell_mask"]
    assert robust.shape == (15, 20) and robust.dtype == torch.bool
    for b, ex in enumerate(examples):
        objs = batch["objects"][b]
        picks = collator.sample_picks(ex)
        assert [o["label"] for o in objs] == [o["label"] for o in ex["objects"]]
        assert [o["mention"] for o in objs] == [['The "red box', 'and the "blue disk'], ['Found "green bar']][b]
        assert [t for o in objs for t in o["vrt_positions"]] == rows[rows[:, 0] == b, 1].tolist()
        for k, obj in enumerate(objs):
            assert obj["vrt_cells"] == [offsets[b] + c for c in picks[k]]
            assert obj["fg_cells"] == [offsets[b] + c for c in ex["objects"][k]["cells"]]
            assert batch["input_ids"][b, P + torch.tensor(obj["vrt_positions"])].tolist() == \
                [V + c for c in obj["vrt_cells"]]
            assert torch.equal(obj["box_xyxy"], torch.tensor(ex["objects"][k]["box"], dtype=torch.float32))
            assert obj["task"] == ex["task"]
            for cell in obj["vrt_cells"]:  # the object's other fg cells, picked one excluded, global ids
                assert set(robust[j].nonzero().flatten().tolist()) == set(obj["fg_cells"]) - {cell}
                j += 1
    assert j == 15
    plain = PaDTCollator(proc, robust=False)(examples)
    assert plain["robust_cell_mask"].shape == (15, 20) and not plain["robust_cell_mask"].any()


def test_gt_masks_at_four_times_the_patch_grid(proc):
    batch = PaDTCollator(proc)(_examples())
    m0, m1 = batch["objects"][0][0]["mask"], batch["objects"][1][0]["mask"]
    assert m0.shape == (4 * 6, 4 * 8) and m0.dtype == torch.float32
    expected0 = torch.zeros(24, 32)
    expected0[:16, :16] = 1  # top-left 56x56 px of 84x112
    assert torch.equal(m0, expected0)
    assert batch["objects"][0][1]["mask"] is None  # box-only object: no mask target
    expected1 = torch.zeros(32, 16)
    expected1[8:24] = 1  # rows 28..84 of 112
    assert m1.shape == (4 * 8, 4 * 4) and torch.equal(m1, expected1)
    m8 = PaDTCollator(proc, mask_upscale=2)(_examples())["objects"][0][0]["mask"]
    assert m8.shape == (12, 16) and m8.sum() == 64


def test_sample_without_objects(proc):
    batch = PaDTCollator(proc)([_empty_example(), _examples()[1]])
    assert batch["objects"][0] == [] and len(batch["objects"][1]) == 1 and batch["num_objects"] == 1
    assert batch["vrt_rows"][:, 0].tolist() == [1] * 5
    assert batch["robust_cell_mask"].shape == (5, 9 + 8)
    assert batch["objects"][1][0]["fg_cells"] == [9 + c for c in (2, 3, 4, 5)]
    alone = PaDTCollator(proc)([_empty_example()])
    assert alone["vrt_rows"].shape == (0, 2) and alone["robust_cell_mask"].shape == (0, 9)
    assert alone["num_objects"] == 0 and alone["completion_mask"].sum() > 5


def test_vrt_picks_are_reproducible_and_epoch_dependent(proc):
    ex0, ex1 = _examples()
    a = PaDTCollator(proc, seed=1)
    in_batch = a([ex0, ex1])["objects"][1][0]["vrt_cells"]
    alone = PaDTCollator(proc, seed=1)([ex1])["objects"][0][0]["vrt_cells"]
    assert [c - 12 for c in in_batch] == alone  # same picks whatever the batch
    picks = [tuple(a.sample_picks(ex0)[1])]
    for epoch in range(1, 5):
        a.set_epoch(epoch)
        picks.append(tuple(a.sample_picks(ex0)[1]))
    assert len(set(picks)) >= 4
    b = PaDTCollator(proc, seed=1)
    b.set_epoch(4)
    assert tuple(b.sample_picks(ex0)[1]) == picks[-1]
    every = PaDTCollator(proc, num_vrt="all")([ex0, ex1])
    assert [o["vrt_cells"] for o in every["objects"][0]] == [o["fg_cells"] for o in every["objects"][0]]
    assert every["robust_cell_mask"].shape == (4 + 6 + 4, 20)


def test_errors_name_the_sample(proc):
    ex0, ex1 = _examples()
    short = ex0 | {"index": 1, "answer_template": "x"}
    totals = PaDTCollator(proc)([short, ex1])["attention_mask"].sum(1).tolist()
    assert totals[1] > totals[0]
    limit = totals[1] - 1
    with pytest.raises(ValueError, match=rf"sample 3: prompt \+ completion is {totals[1]} tokens > max_length {limit}"):
        PaDTCollator(proc, max_length=limit)([short, ex1])
    assert PaDTCollator(proc, max_length=totals[1])([short, ex1])["input_ids"].shape[0] == 2
    wrong = ex1 | {"grid": (2, 2)}
    with pytest.raises(ValueError, match=r"sample 3: the dataset derived cells on a \(2, 2\) merged grid"):
        PaDTCollator(proc)([wrong])
    with pytest.raises(ValueError):
        PaDTCollator(proc, num_vrt=0)
    with pytest.raises(TypeError):
        PaDTCollator(proc.processor)


def test_dataset_to_collator(tmp_path: Path, proc):
    """Generated images + JSONL -> PaDTDataset -> DataLoader with the collator."""
    for name, (w, h) in {"a.png": (112, 84), "b.png": (61, 130)}.items():
        _image(w, h).save(tmp_path / name)
    recs = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>Please describe this image."}],
         "answer_template": "A box (<|Obj_0|>).", "task": "ric",
         "objects": [{"bbox": [0, 0, 0.5, 2 / 3], "rle": _rect_rle(84, 112, slice(0, 56), slice(0, 56)), "label": ""}]},
        {"image": "b.png", "conversations": [{"from": "human", "value": "Please describe this image."}],
         "answer_template": "A bar (<|Obj_0|>) and a bar (<|Obj_1|>).", "task": "ric",
         "objects": [{"bbox": [0, 0, 1, 0.5], "label": ""}, {"bbox": [0, 0.5, 1, 1], "label": ""}]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = PaDTDataset(str(tmp_path / "d.jsonl"), proc, image_folders=str(tmp_path))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=PaDTCollator(proc))
    batch = next(iter(loader))
    grid = batch["image_grid_thw"].tolist()
    assert grid == [[1, 6, 8], [1, 10, 4]]  # 130 x 61 px -> 5 x 2 cells
    assert batch["objects"][0][0]["fg_cells"] == [0, 1, 4, 5]
    assert [o["fg_cells"] for o in batch["objects"][1]] == [[12, 13, 14, 15, 16, 17], [16, 17, 18, 19, 20, 21]]
    assert batch["vrt_rows"].shape == (15, 2) and batch["robust_cell_mask"].shape == (15, 22)


# --------------------------------------------------------------------------- oracle
def _oracle_objects(io: dict, V: int) -> tuple[list[list[list[int]]], list[list[list[int]]]]:
    """Per row, per object: local VRT picks (from the completion, 5 per object) and local fg cells (robust row ∪ pick)."""
    local, robust = io["inputs.completion_ids_local"], io["loss.robust_vrt_mask"]
    cells_per_image = [int(t * h * w) // 4 for t, h, w in io["inputs.image_grid_thw"].tolist()]
    picks, fgs, j = [], [], 0
    for b in range(local.shape[0]):
        ids = [int(x) - V for x in local[b] if x >= V]
        row_picks = [ids[i:i + 5] for i in range(0, len(ids), 5)]
        off = sum(cells_per_image[:b])
        row_fg = []
        for obj_picks in row_picks:
            fg = set()
            for cell in obj_picks:
                fg |= {int(c) - V - off for c in robust[j].nonzero().flatten()} | {cell}
                j += 1
            row_fg.append(sorted(fg))
        picks.append(row_picks)
        fgs.append(row_fg)
    return picks, fgs


def test_robust_mask_reproduces_the_oracle(oracle_io):
    V = 512
    picks, fgs = _oracle_objects(oracle_io, V)
    assert fgs == [[[0, 1, 4, 5], [2, 3, 6, 7, 10, 11]], [[2, 3, 4, 5]]]  # one object with < 5 cells, one with 6
    offsets = [0, 12]
    objects = [[{"vrt_cells": [offsets[b] + c for c in p], "fg_cells": [offsets[b] + c for c in f]}
                for p, f in zip(picks[b], fgs[b])] for b in range(2)]
    ref = oracle_io["loss.robust_vrt_mask"]
    got = robust_cell_mask(objects, num_cells=20)
    assert not ref[:, :V].any() and torch.equal(got, ref[:, V:])


def test_collator_reproduces_the_oracle_batch(oracle_io):
    """The authors' batch (prompts, completions, global ids, masks) from our collator with the recorded picks."""
    proc = PaDTProcessor.from_pretrained(str(ORACLE / "processor"), vrt_base_id=512)
    strings = json.loads((ORACLE / "io.json").read_text())["strings"]
    picks, fgs = _oracle_objects(oracle_io, 512)
    prompts = ['Find "red box" and "blue disk".', 'Where is "green bar"?']
    assert [p in s for p, s in zip(prompts, strings["prompt_text"])] == [True, True]
    boxes = oracle_io["loss.main.gt_bboxes"].float().tolist()
    examples, n = [], 0
    for b in range(2):
        objs = []
        for f in fgs[b]:
            objs.append({"cells": f, "box": boxes[n], "rle": None, "label": ""})
            n += 1
        examples.append({"image": Image.open(ORACLE / "images" / f"img{b}.png").convert("RGB"), "prompt": prompts[b],
                         "answer_template": strings["solutions"][b], "objects": objs, "task": "ovd", "index": b})
    batch = PaDTCollator(proc).collate(examples, [dict(enumerate(p)) for p in picks])
    assert batch["prompt_length"] == 64
    assert torch.equal(batch["input_ids"], oracle_io["inputs.input_ids"])
    assert torch.equal(batch["attention_mask"], oracle_io["inputs.attention_mask"])
    assert torch.equal(batch["completion_mask"], oracle_io["inputs.completion_mask"])
    assert torch.equal(batch["image_grid_thw"], oracle_io["inputs.image_grid_thw"])
    assert torch.equal(batch["pixel_values"], oracle_io["inputs.pixel_values"])
    assert torch.equal(batch["robust_cell_mask"], oracle_io["loss.robust_vrt_mask"][:, 512:])
    assert [[o["vrt_positions"] for o in row] for row in batch["objects"]] == \
        [[list(range(14, 19)), list(range(40, 45))], [list(range(18, 23))]]
