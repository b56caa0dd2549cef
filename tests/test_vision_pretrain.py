"""Vision pretraining of from-scratch models (padt/shapes/vision_pretrain.py, src/pretrain_shapes_vision.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from padt.geometry.masks import rle_encode
from padt.shapes import ShapesConfig, generate_dataset
from padt.shapes.vision_pretrain import cell_class_labels, load_cell_records
from padt.testing.models import build_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
import pretrain_shapes_vision

CLASSES = ("square", "circle")


def _obj(mask: np.ndarray, label: str) -> dict:
    return {"rle": rle_encode(mask), "label": label}


def test_cell_labels_take_the_object_covering_most_of_each_cell():
    # 2 x 3 cells of 10 px. A square fills cell (0, 0) and 40 % of cell (0, 1); a circle covers 60 % of (0, 1) and
    # 20 % of (1, 2), below min_coverage.
    square = np.zeros((20, 30), np.uint8)
    square[0:10, 0:14] = 1
    circle = np.zeros((20, 30), np.uint8)
    circle[0:10, 14:20] = 1
    circle[10:12, 20:30] = 1
    labels = cell_class_labels([_obj(square, "square"), _obj(circle, "circle")], CLASSES, (2, 3), cell_size=10)
    assert labels.dtype == np.int64
    assert labels.tolist() == [1, 2, 0, 0, 0, 0]
    # a lower bar gives the circle the bottom-right cell too
    assert cell_class_labels([_obj(circle, "circle")], CLASSES, (2, 3), 10, min_coverage=0.2).tolist() == [
        0, 2, 0, 0, 0, 2]
    assert cell_class_labels([], CLASSES, (2, 3), 10).tolist() == [0] * 6


def test_cell_labels_reject_bad_input():
    mask = np.ones((20, 30), np.uint8)
    with pytest.raises(ValueError, match="'triangle' is not one of the classes"):
        cell_class_labels([_obj(mask, "triangle")], CLASSES, (2, 3), 10)
    with pytest.raises(ValueError, match="min_coverage"):
        cell_class_labels([_obj(mask, "square")], CLASSES, (2, 3), 10, min_coverage=0.0)


def test_load_cell_records_checks_files(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"image": "x.png", "objects": [_obj(np.ones((4, 4), np.uint8), "square")]}) + "\n")
    recs = load_cell_records([good], [tmp_path / "imgs"])
    assert recs[0]["image"] == str(tmp_path / "imgs" / "x.png") and recs[0]["objects"][0]["label"] == "square"
    with pytest.raises(ValueError, match="one folder per file"):
        load_cell_records([good], [])
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"image": "x.png", "objects": [{"label": "square"}]}) + "\n")
    with pytest.raises(ValueError, match="line 1: every object needs 'rle' and 'label'"):
        load_cell_records([bad], [tmp_path])
    empty = tmp_path / "c.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        load_cell_records([empty], [tmp_path])


def test_cell_pixel_targets_follow_the_cell_order():
    """A 56 x 56 image of four plain 28-px cells: each cell's target is its own colour, normalised as the processor
    normalises it, in row-major cell order."""
    from types import SimpleNamespace

    from PIL import Image

    from padt.shapes.vision_pretrain import cell_pixel_targets
    from padt.testing.tokenizer import build_tiny_processor, build_tiny_tokenizer

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    image = np.zeros((56, 56, 3), np.uint8)
    for k, rgb in enumerate(colours):
        image[(k // 2) * 28:(k // 2 + 1) * 28, (k % 2) * 28:(k % 2 + 1) * 28] = rgb
    ip = build_tiny_processor(build_tiny_tokenizer(), min_pixels=56 * 56, max_pixels=56 * 56).image_processor
    pixel_values = ip(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
    config = SimpleNamespace(in_channels=3, temporal_patch_size=2, patch_size=14, spatial_merge_size=2)
    targets = cell_pixel_targets(pixel_values, config, pool=7)
    assert targets.shape == (4, 4 * 3 * 2 * 2)
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    for k, rgb in enumerate(colours):
        expected = (torch.tensor(rgb) / 255.0 - mean) / std  # (3,)
        got = targets[k].view(4, 3, 2, 2)  # sub-patch x channel x pooled rows x pooled cols
        assert torch.allclose(got, expected[None, :, None, None].expand_as(got), atol=1e-5), k
    with pytest.raises(ValueError, match="not divisible"):
        cell_pixel_targets(pixel_values, config, pool=3)


def test_cell_positions_are_row_major_centres_per_image():
    from padt.shapes.vision_pretrain import cell_positions

    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])  # 2 x 3 cells, then 1 x 1 cell (merge 2)
    pos = cell_positions(grid, 2)
    assert pos.shape == (7, 2)
    assert torch.allclose(pos[:6], torch.tensor([[0.25, 1 / 6], [0.25, 0.5], [0.25, 5 / 6],
                                                 [0.75, 1 / 6], [0.75, 0.5], [0.75, 5 / 6]]))
    assert pos[6].tolist() == [0.5, 0.5]


SCENES = ShapesConfig(height=112, width=112, colours=("red", "blue"), kinds=("square", "triangle"),
                      backgrounds=("gray",), min_objects=1, max_objects=2, size_range=(0.35, 0.6))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    """A tiny model's tower pretrained for 40 steps on 64 scenes (about 15 s), then 20 steps more (a resumed rerun)."""
    root = tmp_path_factory.mktemp("vision_pretrain")
    data = root / "data"
    generate_dataset(data, {"train": 64, "val": 16}, seed=5, config=SCENES)
    pixels = SCENES.height * SCENES.width
    build_tiny_checkpoint(str(root / "init"), seed=0, placeholder=False, min_pixels=pixels, max_pixels=pixels,
                          vrt_feature_order="merge_block")
    args = ["--model", str(root / "init"), "--data", str(data), "--out", str(root / "out"), "--batch-size", "8",
            "--learning-rate", "5e-3", "--warmup-steps", "5", "--eval-images", "16"]
    pretrain_shapes_vision.main([*args, "--steps", "40"])
    first = json.loads((root / "out" / "vision_pretrain.json").read_text())
    first_weights = load_file(str(root / "out" / "model.safetensors"))
    pretrain_shapes_vision.main([*args, "--steps", "60"])
    return {"root": root, "first": first, "first_weights": first_weights,
            "second": json.loads((root / "out" / "vision_pretrain.json").read_text())}


def test_pretraining_learns_cell_kinds_and_changes_only_the_tower(pretrained):
    root = pretrained["root"]
    report = pretrained["first"]
    # two kinds: chance on object cells is about 0.5; the untrained tower's head does not exist yet
    assert report["object_cell_category_accuracy"] > 0.65, report
    val = load_cell_records([root / "data" / "ovd_val.jsonl"], [root / "data" / "images"])
    labels = np.concatenate([cell_class_labels(r["objects"], ("square", "triangle"), (4, 4), 28) for r in val])
    majority = np.bincount(labels).max() / labels.size  # always answering the most frequent class
    assert report["cell_accuracy"] > majority + 0.1, (report, majority)
    before = load_file(str(root / "init" / "model.safetensors"))
    after = pretrained["first_weights"]
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".visual." in k or k.startswith("visual.") for k in changed), sorted(changed)[:5]
    assert any("patch_embed" in k for k in changed) and any("merger" in k for k in changed)


def test_pretraining_resumes_and_saves_a_padt_model(pretrained):
    from padt import PaDTForConditionalGeneration

    root = pretrained["root"]
    state = json.loads((root / "out" / "trainer" / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60
    # the rerun continued from checkpoint-40 instead of starting again: its log starts after step 40
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps and min(steps) == 50, steps
    assert pretrained["second"]["steps"] == 60
    model = PaDTForConditionalGeneration.from_pretrained(root / "out")
    saved = load_file(str(root / "out" / "model.safetensors"))
    name = next(k for k in saved if k.endswith("patch_embed.proj.weight"))
    assert torch.equal(model.model.visual.patch_embed.proj.weight, saved[name])  # loads as a PaDT model
    assert not torch.equal(saved[name], pretrained["first_weights"][name])  # the resumed steps trained further


def test_pretrained_features_keep_their_starting_scale(pretrained):
    from padt import PaDTForConditionalGeneration
    from padt.processing import load_processor
    from padt.shapes.vision_pretrain import CellClassDataset, cell_feature_rms, collate_cells

    root, report = pretrained["root"], pretrained["second"]
    assert report["cell_feature_rms_trained"] > 3 * report["cell_feature_rms_before"]  # what the rescale undoes
    records = load_cell_records([root / "data" / "ovd_train.jsonl"], [root / "data" / "images"])
    probe = CellClassDataset(records[:16], load_processor(root / "out").image_processor, ("square", "triangle"))
    visual = PaDTForConditionalGeneration.from_pretrained(root / "out").model.visual
    rms = cell_feature_rms(visual, collate_cells([probe[i] for i in range(16)]))
    assert rms == pytest.approx(report["cell_feature_rms_before"], rel=1e-4)


def test_script_rejects_folders_without_manifest(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain_shapes_vision.main(["--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "has no manifest.json" in capsys.readouterr().err


def test_load_coco_cell_records_labels_objects_by_their_attributes(tmp_path):
    from padt.shapes.vision_pretrain import load_coco_cell_records

    rle = _obj(np.ones((4, 4), np.uint8), "x")["rle"]
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "annotations": [
            {"id": 1, "image_id": 2, "segmentation": rle, "attributes": {"colour": "red", "kind": "circle"}},
            {"id": 2, "image_id": 2, "segmentation": rle, "attributes": {"colour": "blue", "kind": "square"}},
        ],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    recs = load_coco_cell_records([path], [tmp_path / "imgs"], ("colour", "kind"))
    assert [r["image"] for r in recs] == [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "b.png")]
    assert recs[0]["objects"] == [] and [o["label"] for o in recs[1]["objects"]] == ["red circle", "blue square"]
    assert recs[1]["objects"][0]["rle"] == rle
    with pytest.raises(ValueError, match=r"annotation 1 has no attribute\(s\) \['size'\]"):
        load_coco_cell_records([path], [tmp_path], ("size",))
    with pytest.raises(ValueError, match="one folder per file"):
        load_coco_cell_records([path], [], ("kind",))
    (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="holds no images"):
        load_coco_cell_records([tmp_path / "empty.json"], [tmp_path], ("kind",))


def test_script_colour_kind_classes_come_from_the_coco_attributes(pretrained, monkeypatch, tmp_path):
    import padt.shapes.vision_pretrain as vp

    seen = {}

    def fake_pretrain(model, train, class_names, out, training_args, eval_records, min_coverage):
        seen.update(train=train, class_names=class_names, eval_records=eval_records)
        Path(out).mkdir(parents=True)
        return {"train_loss": 0.0}

    monkeypatch.setattr(vp, "pretrain_vision", fake_pretrain)
    data = pretrained["root"] / "data"
    pretrain_shapes_vision.main(["--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o"),
                                 "--cell-classes", "colour_kind", "--eval-images", "5"])
    assert seen["class_names"] == ["red square", "red triangle", "blue square", "blue triangle"]
    assert len(seen["train"]) == 64 and len(seen["eval_records"]) == 5
    labels = {o["label"] for r in seen["train"] for o in r["objects"]}
    assert labels and labels <= set(seen["class_names"])
    coco = json.loads((data / "coco_train.json").read_text())
    first = coco["annotations"][0]
    want = f"{first['attributes']['colour']} {first['attributes']['kind']}"
    image = next(r for r in seen["train"] if r["image"].endswith(
        next(im["file_name"] for im in coco["images"] if im["id"] == first["image_id"])))
    assert image["objects"][0]["label"] == want
