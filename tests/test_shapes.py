"""The synthetic shapes data set (padt.shapes, src/preprocess/make_shapes.py): deterministic, self-consistent files in
the released format, unique referring expressions, and COCO ground truth that pycocotools reads."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from padt.geometry.masks import FOREGROUND_RULES, foreground_cells, rle_area, rle_decode, rle_to_bbox_xywh
from padt.preprocess import GridSpec, OVDOptions, SkipReport, load_coco_instances, ovd_records
from padt.preprocess.templates import RIC_PROMPT, ovd_prompt, rec_answer, rec_prompt
from padt.shapes import (
    PALETTE,
    Expression,
    ObjectFacts,
    ShapesConfig,
    caption,
    facts_from_coco,
    generate_dataset,
    parse_expression,
    referents,
    render_scene,
    sample_scene,
    scene_rng,
)

pytest.importorskip("cv2")
RECORD_KEYS = ["id", "image", "conversations", "answer_template", "objects", "task"]
OBJECT_KEYS = ["patches", "bbox", "iscrowd", "area", "rle", "label"]
COUNTS = {"train": 10, "val": 6}
SCRIPT = Path(__file__).resolve().parents[1] / "src" / "preprocess" / "make_shapes.py"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_dataset(out, COUNTS, seed=3)
    return out


def _all_records(data: Path):
    for split in COUNTS:
        for name in ("refer", "ovd", "ric"):
            for rec in _read_jsonl(data / f"{name}_{split}.jsonl"):
                yield split, rec


# --------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_files_with_any_worker_count(tmp_path, data):
    generate_dataset(tmp_path / "a", COUNTS, seed=3, workers=2)  # `data` was drawn in this process
    a, ref = _tree(tmp_path / "a"), _tree(data)
    assert sorted(a) == sorted(ref)
    assert len([k for k in a if k.startswith("images/")]) == sum(COUNTS.values())
    assert all(a[k] == ref[k] for k in a), [k for k in a if a[k] != ref[k]]


def test_worker_count_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        generate_dataset(tmp_path / "w", {"train": 1}, seed=3, workers=0)


def test_different_seed_differs_and_prefix_is_stable(tmp_path, data):
    generate_dataset(tmp_path / "b", {"train": 3}, seed=4)
    for name in ("refer_train.jsonl", "images/train_000000.png", "images/train_000002.png"):
        assert (tmp_path / "b" / name).read_bytes() != (data / name).read_bytes()
    # scene i does not depend on how many scenes are generated
    generate_dataset(tmp_path / "c", {"train": 3}, seed=3)
    for i in range(3):
        assert (tmp_path / "c" / f"images/train_{i:06d}.png").read_bytes() == (data / f"images/train_{i:06d}.png").read_bytes()
    # train and val come from different streams
    assert (data / "images/train_000000.png").read_bytes() != (data / "images/val_000000.png").read_bytes()


def test_manifest(data):
    m = json.loads((data / "manifest.json").read_text())
    assert m["seed"] == 3 and m["grid"] == [6, 6]
    assert m["processor"]["min_pixels"] == m["processor"]["max_pixels"] == 168 * 168
    assert {s: c["images"] for s, c in m["splits"].items()} == COUNTS
    assert m["options"] == ShapesConfig().to_dict()
    assert len(m["files"]) == sum(COUNTS.values()) + 5 * len(COUNTS)
    assert m["splits"]["train"]["refer_records"] == m["splits"]["train"]["objects"] == sum(
        len(r["objects"]) for r in _read_jsonl(data / "ric_train.jsonl"))


# --------------------------------------------------------------------------- record format
def test_records_have_the_released_fields_in_order(data):
    tasks = defaultdict(set)
    for split, rec in _all_records(data):
        assert list(rec) == RECORD_KEYS
        assert list(rec["conversations"][0]) == ["from", "value"] and rec["conversations"][0]["from"] == "human"
        assert isinstance(rec["id"], int) and (data / "images" / rec["image"]).is_file()
        for obj in rec["objects"]:
            assert list(obj) == OBJECT_KEYS
            assert obj["iscrowd"] == 0 and list(obj["rle"]) == ["size", "counts"] and isinstance(obj["rle"]["counts"], str)
        n_refs = rec["answer_template"].count("<|Obj_")
        assert n_refs == len(rec["objects"])
        tasks[split].add(rec["task"])
        prompt = rec["conversations"][0]["value"]
        if rec["task"] == "refering":
            sentence = rec["objects"][0]["label"]
            assert len(rec["objects"]) == 1 and prompt == rec_prompt(sentence)
            assert rec["answer_template"] == rec_answer(sentence)
        elif rec["task"] == "ovd":
            assert sorted(json.loads(prompt[prompt.index("["):-1])) == sorted(ShapesConfig().kinds)
            assert all(obj["label"] in ShapesConfig().kinds for obj in rec["objects"])
        else:
            assert prompt == RIC_PROMPT and all(obj["label"] == "" for obj in rec["objects"])
    assert all(t == {"refering", "ovd", "ric"} for t in tasks.values())


def test_files_load_with_the_training_reader(data):
    from padt.data.records import JsonlRecords

    for split in COUNTS:
        for name in ("refer", "ovd", "ric"):
            records = JsonlRecords(data / f"{name}_{split}.jsonl")
            assert len(records) == len(_read_jsonl(data / f"{name}_{split}.jsonl"))


def test_patches_are_the_foreground_cells_of_the_rle(data):
    config = ShapesConfig()
    for _, rec in _all_records(data):
        for obj in rec["objects"]:
            mask = rle_decode(obj["rle"])
            assert mask.shape == (config.height, config.width)
            expected = foreground_cells(mask, 6, 6, cell_size=28, **FOREGROUND_RULES[rec["task"]].kwargs())
            assert obj["patches"] == expected and len(expected) >= config.min_cells


def test_boxes_are_inside_the_image_and_match_the_mask(data):
    for _, rec in _all_records(data):
        for obj in rec["objects"]:
            x1, y1, x2, y2 = obj["bbox"]
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            x, y, w, h = rle_to_bbox_xywh(obj["rle"])
            assert np.allclose([x1 * 168, y1 * 168, x2 * 168, y2 * 168], [x, y, x + w, y + h])
            assert obj["area"] == rle_area(obj["rle"]) > 0


def test_pixels_show_the_masks(data):
    """Inside each visible mask the image has the object's colour (up to jitter and noise)."""
    config = ShapesConfig()
    coco = json.loads((data / "coco_val.json").read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    for ann in coco["annotations"]:
        pixels = np.asarray(Image.open(data / "images" / files[ann["image_id"]]).convert("RGB"), dtype=int)
        inside = pixels[rle_decode(ann["segmentation"]).astype(bool)]
        target = np.asarray(PALETTE[ann["attributes"]["colour"]])
        assert np.abs(inside - target).max() <= config.colour_jitter + config.noise


# --------------------------------------------------------------------------- referring expressions
def test_every_expression_picks_exactly_its_object(data):
    config = ShapesConfig()
    for split in COUNTS:
        coco = json.loads((data / f"coco_{split}.json").read_text())
        anns = defaultdict(list)
        for ann in coco["annotations"]:
            anns[ann["image_id"]].append(ann)
        records = _read_jsonl(data / f"refer_{split}.jsonl")
        assert len(records) == len(coco["annotations"])
        for rec in records:
            image_anns = anns[rec["id"]]
            expr = parse_expression(rec["objects"][0]["label"])
            hits = referents(expr, [facts_from_coco(a) for a in image_anns], config)
            assert len(hits) == 1
            assert image_anns[hits[0]]["segmentation"] == rec["objects"][0]["rle"]
            assert image_anns[hits[0]]["attributes"]["expression"] == expr.text()


def test_sampled_scenes_keep_their_constraints():
    config = ShapesConfig()
    relations = set()
    for i in range(40):
        scene = sample_scene(scene_rng(11, "train", i), config)
        facts = [o.facts for o in scene.objects]
        assert config.min_objects <= len(facts) <= config.max_objects
        assert [f.cx for f in facts] == sorted(f.cx for f in facts)  # reading order
        assert sorted(scene.draw_order) == list(range(len(facts)))
        for k, obj in enumerate(scene.objects):
            assert referents(parse_expression(obj.expression), facts, config) == [k]
            relations.add(parse_expression(obj.expression).relation)
            assert obj.area >= (1 - config.max_occlusion) * obj.shape.mask(168, 168).sum()
        assert render_scene(scene).size == (config.width, config.height)
    assert None in relations and len(relations) >= 3  # plain and disambiguated expressions both occur


def test_referents_semantics():
    config = ShapesConfig()  # margins: 0.15 * 168 = 25.2 px; size ratio 1.5
    facts = [ObjectFacts("red", "circle", 30, 80, 900), ObjectFacts("red", "circle", 140, 90, 2000),
             ObjectFacts("blue", "square", 60, 60, 1000)]
    assert referents(Expression("red", "circle"), facts, config) == [0, 1]
    assert referents(Expression("red", "circle", "left"), facts, config) == [0]
    assert referents(Expression("red", "circle", "right"), facts, config) == [1]
    assert referents(Expression("red", "circle", "top"), facts, config) == []  # 10 px apart: no clear margin
    assert referents(Expression("red", "circle", "larger"), facts, config) == [1]
    assert referents(Expression("blue", "square", "smaller"), facts, config) == [2]  # no rival: vacuous
    assert referents(Expression("green", "square"), facts, config) == []


def test_expression_text_round_trip():
    for expr in (Expression("red", "circle"), Expression("white", "triangle", "larger"),
                 Expression("blue", "square", "bottom"), Expression("green", "circle", "left")):
        assert parse_expression(expr.text()) == expr
    assert Expression("red", "circle", "left").text() == "the red circle on the left"
    assert Expression("red", "circle", "smaller").text() == "the smaller red circle"
    for bad in ("the red", "a red circle", "the larger red circle on the left", "the mauve circle", "the red cube"):
        with pytest.raises(ValueError):
            parse_expression(bad)


# --------------------------------------------------------------------------- OVD, RIC, COCO
def test_coco_json_loads_with_pycocotools(data):
    from pycocotools.coco import COCO

    for split, n_images in COUNTS.items():
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(data / f"coco_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(ShapesConfig().kinds)
        assert len(coco.getImgIds()) == n_images
        ann = coco.loadAnns(coco.getAnnIds())[0]
        assert coco.annToMask(ann).sum() == ann["area"]


def test_ovd_records_equal_the_coco_preprocessing_of_the_ground_truth(data):
    """Val prompts are in category-id order, so the generic COCO -> OVD converter must reproduce them exactly."""
    coco = load_coco_instances(data / "coco_val.json")
    rebuilt = list(ovd_records(coco, options=OVDOptions(shuffle=False), grid=GridSpec(14, 2),
                               rule=FOREGROUND_RULES["ovd"], rng=np.random.default_rng(0), report=SkipReport()))
    assert rebuilt == _read_jsonl(data / "ovd_val.jsonl")
    train = _read_jsonl(data / "ovd_train.jsonl")
    prompts = {r["conversations"][0]["value"] for r in train}
    assert len(prompts) > 1  # shuffled, seeded orders for training
    assert {r["conversations"][0]["value"] for r in rebuilt} == {ovd_prompt(list(ShapesConfig().kinds))}


def test_ric_captions(data):
    captions = json.loads((data / "ric_val_captions.json").read_text())["annotations"]
    records = _read_jsonl(data / "ric_val.jsonl")
    assert len(captions) == len(records)
    for cap, rec in zip(captions, records):
        template = rec["answer_template"]
        assert cap["image_id"] == rec["id"]
        assert template.replace(" (<|Obj_", "\0").split("\0")[0].lower() in cap["caption"].lower()
        for k in range(len(rec["objects"])):
            assert f"(<|Obj_{k}|>)" in template
        assert template.endswith(" background.") and cap["caption"].endswith(" background.")


def test_caption_wording():
    scene = sample_scene(scene_rng(0, "val", 0), ShapesConfig(min_objects=3, max_objects=3))
    names = [f"{o.shape.colour} {o.shape.kind}" for o in scene.objects]
    assert caption(scene) == (f"A {names[0]} (<|Obj_0|>), a {names[1]} (<|Obj_1|>) and a {names[2]} (<|Obj_2|>) "
                              f"on a {scene.background} background.")
    assert caption(scene, with_refs=False) == f"A {names[0]}, a {names[1]} and a {names[2]} on a {scene.background} background."


# --------------------------------------------------------------------------- options and CLI
@pytest.mark.parametrize("kwargs", [
    {"colours": ("red", "mauve")}, {"kinds": ()}, {"size_range": (0.5, 0.2)}, {"min_objects": 3, "max_objects": 2},
    {"height": 10, "width": 10}, {"ovd_prompt_order": "random"}, {"max_occlusion": 1.0},
])
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        ShapesConfig(**kwargs)


def test_impossible_scene_raises():
    config = ShapesConfig(min_objects=4, max_objects=4, size_range=(0.9, 0.9), max_occlusion=0.0, max_attempts=3)
    with pytest.raises(RuntimeError, match="no valid scene"):
        sample_scene(scene_rng(0, "train", 0), config)
    with pytest.raises(ValueError, match="split"):
        scene_rng(0, "dev", 0)


def _load_cli():
    spec = importlib.util.spec_from_file_location("make_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli(tmp_path, capsys):
    cli = _load_cli()
    assert cli.parse_image_size("112x140") == (112, 140) and cli.parse_image_size("84") == (84, 84)
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--num-images", "2", "--num-val-images", "1", "--image-size", "112x140",
            "--kinds", "circle", "square", "--no-progress"]
    assert cli.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["grid"] == [4, 5] and manifest["options"]["kinds"] == ["circle", "square"]
    assert Image.open(out / "images" / "val_000000.png").size == (140, 112)
    assert cli.main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0
    assert cli.main(["--out", str(tmp_path / "x"), "--num-images", "0", "--num-val-images", "0"]) == 2
