"""padt.data records, sources, VRT sampling and PaDTDataset: reading, mixing, errors, re-derived foreground cells."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from padt.data import (
    DataSource,
    GridGeometry,
    PaDTDataset,
    build_answer,
    check_num_vrt,
    load_sources,
    parse_sources,
    pick_cells,
    placeholder_ids,
    placeholder_mentions,
    sample_object_vrts,
    sample_rng,
    split_hub_path,
)
from padt.geometry.grids import merged_grid_for_image
from padt.geometry.masks import FOREGROUND_RULES, foreground_cells, rle_encode
from padt.preprocess.common import GridSpec
from padt.preprocess.objects import object_from_geometry
from padt.preprocess.templates import make_record

pytest.importorskip("cv2")
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 256 * 28 * 28
GEOMETRY = GridGeometry(patch_size=14, merge_size=2, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
RELEASED_GRID = GridSpec(patch_size=14, merge_size=2)  # the released data's rounded 28-px grid


# --------------------------------------------------------------------------- fixtures
def _ellipse_mask(h: int, w: int, box: tuple[float, float, float, float]) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).ellipse(box, fill=1)
    return np.array(img, dtype=np.uint8)


def _object(task: str, label: str, hw: tuple[int, int], *, mask: np.ndarray | None = None, box_xywh=None) -> dict:
    """An object as the preprocessing writes it (stored ``patches`` on the released grid)."""
    h, w = hw
    obj, reason = object_from_geometry(
        segmentation=rle_encode(mask) if mask is not None else None, bbox_xywh=box_xywh, height=h, width=w,
        grid_hw=RELEASED_GRID.grid(h, w), grid=RELEASED_GRID, rule=FOREGROUND_RULES[task], label=label)
    assert reason is None, reason
    return obj


def _record(name: str, h: int, w: int, task: str, seed: int) -> dict:
    """A record with two blob objects (near-threshold cells) and one box-only object."""
    rng = np.random.default_rng(seed)
    objs = []
    for i in range(2):
        x0, y0 = rng.uniform(0, w * 0.5), rng.uniform(0, h * 0.5)
        box = (x0, y0, x0 + rng.uniform(15, w * 0.5), y0 + rng.uniform(15, h * 0.5))
        objs.append(_object(task, f"blob {i}", (h, w), mask=_ellipse_mask(h, w, box)))
    objs.append(_object(task, "box", (h, w), box_xywh=[w * 0.6 + 0.3, h * 0.55, w * 0.3, h * 0.3 + 0.7]))
    template = 'A "blob" (<|Obj_1|>) left of a blob (<|Obj_0|>) and a box (<|Obj_2|>).'
    return make_record(seed, name, "<image>Please describe this image.", template, objs, task)


def _write_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in sizes.items():
        Image.new("RGB", (w, h), (20 * len(name) % 255, 90, 140)).save(folder / name)


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


SIZES = {"a.png": (97, 150), "b.png": (130, 61), "c.png": (200, 170)}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    _write_images(tmp_path / "images", SIZES)
    records = [_record(n, h, w, task, i) for i, ((n, (h, w)), task) in
               enumerate(zip(SIZES.items(), ["ovd", "refering", "ric"]))]
    # exactly 1/28 coverage in cell (0, 2): foreground for ">=" (ovd, ric), not for ">" (refering)
    edge = np.zeros((56, 84), np.uint8)
    edge[:28, 28:56] = 1
    edge[0, 56:84] = 1
    _write_images(tmp_path / "images", {"edge.png": (56, 84)})
    for task in ("ovd", "refering"):
        obj = _object(task, "edge", (56, 84), mask=edge)
        records.append(make_record(9, "edge.png", "p", "<|Obj_0|>", [obj], task))
    assert [r["objects"][0]["patches"] for r in records[-2:]] == [[1, 2], [1]]
    _write_jsonl(tmp_path / "train.json", records)
    _write_jsonl(tmp_path / "other.jsonl", records[:1])
    return tmp_path


# --------------------------------------------------------------------------- records and sources
def test_jsonl_reading_matches_the_file(data_dir: Path):
    ds = PaDTDataset(str(data_dir / "train.json"), GEOMETRY, image_folders=str(data_dir / "images"))
    assert len(ds) == 5
    item = ds[1]
    assert item["index"] == 1 and item["task"] == "refering" and item["image"].size == (61, 130)
    assert item["prompt"] == "Please describe this image." and item["where"].endswith("train.json:2")
    assert [o["label"] for o in item["objects"]] == ["blob 0", "blob 1", "box"]
    assert item["objects"][2]["rle"] is None and item["objects"][0]["rle"]["size"] == [130, 61]
    assert item["image"].mode == "RGB"


def test_malformed_lines_name_path_and_line(tmp_path: Path):
    good = make_record(1, "x.png", "p", "There is 1 \"cat\" (<|Obj_0|>) in this image.",
                       [{"bbox": [0, 0, 0.5, 0.5], "patches": [0], "label": "cat"}], "ovd")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + '{"image": "y.png", "conversations": [\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        PaDTDataset(str(path), GEOMETRY)
    cases = {
        "objects": ({k: v for k, v in good.items() if k != "objects"}, r"missing field\(s\) \['objects'\]"),
        "bbox": ({**good, "objects": [{"label": "cat"}]}, r"objects\[0\]: missing field 'bbox'"),
        "box4": ({**good, "objects": [{"bbox": [0, 0, 1]}]}, "4 finite numbers"),
        "obj_k": ({**good, "answer_template": "<|Obj_0|> <|Obj_3|>"}, r"names object\(s\) \[3\]"),
        "vrt": ({**good, "answer_template": "<|VRT_3|>"}, "literal VRT token"),
        "prompt": ({**good, "conversations": []}, "conversations"),
        "rle": ({**good, "objects": [{"bbox": [0, 0, 1, 1], "rle": {"counts": "x"}}]}, "COCO RLE"),
    }
    for name, (record, msg) in cases.items():
        path = _write_jsonl(tmp_path / f"{name}.jsonl", [good, good, record])
        with pytest.raises(ValueError, match=rf"{name}\.jsonl:3.*{msg}"):
            PaDTDataset(str(path), GEOMETRY)
    array_file = tmp_path / "array.json"
    array_file.write_text("[\n" + json.dumps(good) + "\n]\n")
    with pytest.raises(ValueError, match="array.json:1.*not a JSON array"):
        PaDTDataset(str(array_file), GEOMETRY)


def test_colon_separated_mixing(data_dir: Path):
    imgs = str(data_dir / "images")
    paths = f"{data_dir / 'train.json'}:{data_dir / 'other.jsonl'}"
    sources = parse_sources(paths, f"{imgs}:{imgs}")
    assert [s.repeat for s in sources] == [1, 1] and sources[1].image_folder == imgs
    with pytest.raises(ValueError, match=r"names 2 file\(s\) but image_folders names 1"):
        parse_sources(paths, imgs)
    with pytest.raises(ValueError, match="empty entry"):
        parse_sources(f"{data_dir / 'train.json'}::x")
    ds = PaDTDataset(paths, GEOMETRY, image_folders=f"{imgs}:{imgs}")
    assert len(ds) == 6
    assert [ds.locate(i) for i in range(6)] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)]
    assert ds[5]["where"].endswith("other.jsonl:1") and ds[5]["index"] == 5
    assert ds[5]["objects"][0]["cells"] == ds[0]["objects"][0]["cells"]
    with pytest.raises(IndexError):
        ds[6]


def test_yaml_mixture_with_repeat(data_dir: Path):
    (data_dir / "mix.yaml").write_text(
        "- path: train.json\n  image_folder: images\n  repeat: 2\n  name: coco\n"
        "- {path: other.jsonl, image_folder: images}\n"
    )
    ds = PaDTDataset(str(data_dir / "mix.yaml"), GEOMETRY)
    assert [(s.label, s.repeat) for s in ds.sources] == [("coco", 2), (str(data_dir / "other.jsonl"), 1)]
    assert len(ds) == 5 * 2 + 1
    assert [ds.locate(i) for i in (0, 4, 5, 6, 9, 10)] == [(0, 0), (0, 4), (0, 0), (0, 1), (0, 4), (1, 0)]
    assert ds[6]["where"] == ds[1]["where"] and ds[6]["index"] == 6 and ds[6]["source"] == "coco"
    (data_dir / "typo.yaml").write_text("datasets:\n  - path: train.json\n    image_folders: images\n")
    with pytest.raises(ValueError, match=r"entry 0: unknown key\(s\) \['image_folders'\]"):
        load_sources(str(data_dir / "typo.yaml"))
    (data_dir / "rep.yaml").write_text("- {path: train.json, repeat: 0}\n")
    with pytest.raises(ValueError, match="repeat must be an int >= 1"):
        load_sources(str(data_dir / "rep.yaml"))
    with pytest.raises(ValueError, match="must not be given with a YAML"):
        load_sources(str(data_dir / "mix.yaml"), "images")


def test_missing_data_file_and_image(data_dir: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        PaDTDataset(str(tmp_path / "nope.json"), GEOMETRY)
    with pytest.raises(FileNotFoundError, match="not a local file"):
        PaDTDataset("just_a_name.json", GEOMETRY)
    ds = PaDTDataset(str(data_dir / "train.json"), GEOMETRY, image_folders=str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=r"elsewhere/b\.png \(record .*train\.json:2\)"):
        ds[1]
    with pytest.raises(FileNotFoundError, match=r"5 image file\(s\) not found"):
        PaDTDataset(str(data_dir / "train.json"), GEOMETRY, image_folders=str(tmp_path / "elsewhere"),
                    check_images=True)


def test_unknown_task_needs_a_rule(data_dir: Path):
    rec = json.loads((data_dir / "train.json").read_text().splitlines()[0])
    path = _write_jsonl(data_dir / "custom.jsonl", [{**rec, "task": "grounding"}])
    ds = PaDTDataset(str(path), GEOMETRY, image_folders=str(data_dir / "images"))
    with pytest.raises(ValueError, match="unknown task 'grounding'"):
        ds[0]
    ds = PaDTDataset(str(path), GEOMETRY, image_folders=str(data_dir / "images"),
                     foreground_rules={"grounding": FOREGROUND_RULES["ovd"]})
    assert ds[0]["objects"][0]["cells"]


def test_hub_path_goes_through_datasets_load_dataset(data_dir: Path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    real_load = datasets.load_dataset
    calls = []

    def fake_load(repo, data_files=None, **kwargs):  # the hub call, served by a local json load (no network)
        calls.append((repo, data_files))
        return real_load("json", data_files=str(data_dir / "train.json"), cache_dir=str(data_dir / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert split_hub_path("PaDT-MLLM/COCO/instances_train2017.json") == ("PaDT-MLLM/COCO", "instances_train2017.json")
    assert split_hub_path("org/repo/sub/f.json") == ("org/repo", "sub/f.json")
    assert split_hub_path("/abs/a/b.json") is None and split_hub_path("repo/file.json") is None
    hub = PaDTDataset("PaDT-MLLM/COCO/instances_train2017.json", GEOMETRY, image_folders=str(data_dir / "images"))
    assert calls == [("PaDT-MLLM/COCO", "instances_train2017.json")]
    local = PaDTDataset(str(data_dir / "train.json"), GEOMETRY, image_folders=str(data_dir / "images"))
    assert len(hub) == len(local) == 5
    for i in range(5):
        a, b = hub[i], local[i]
        assert a["where"] == f"PaDT-MLLM/COCO/instances_train2017.json row {i}"
        assert a["prompt"] == b["prompt"] and a["answer_template"] == b["answer_template"]
        assert [o["cells"] for o in a["objects"]] == [o["cells"] for o in b["objects"]]
        assert [o["rle"] for o in a["objects"]] == [o["rle"] for o in b["objects"]]  # missing rle -> None


# --------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_and_follows_the_replacement_rule():
    cells = [3, 8, 9, 14, 20, 21, 30]
    a = pick_cells(cells, 5, sample_rng(42, 0, 7))
    assert a == pick_cells(cells, 5, sample_rng(42, 0, 7))
    assert len(set(a)) == 5 and set(a) <= set(cells)  # without replacement
    others = {tuple(pick_cells(cells, 5, sample_rng(42, e, 7))) for e in range(1, 6)}
    assert len(others - {tuple(a)}) >= 4  # another epoch, other picks
    few = [[pick_cells([4, 5], 5, sample_rng(0, 0, i)) for i in range(20)]][0]
    assert all(len(p) == 5 and set(p) <= {4, 5} for p in few) and any(len(set(p)) == 2 for p in few)
    assert pick_cells([1], 5, sample_rng(0, 0, 0)) == [1] * 5
    assert pick_cells(cells, "all", sample_rng(0, 0, 0)) == cells == pick_cells(cells, -1, sample_rng(0, 0, 0))
    assert check_num_vrt("ALL") == "all" and check_num_vrt(3) == 3
    for bad in (0, -2, "five"):
        with pytest.raises(ValueError):
            check_num_vrt(bad)
    with pytest.raises(TypeError):
        check_num_vrt(True)
    with pytest.raises(ValueError, match="at least one"):
        pick_cells([], 5, sample_rng(0, 0, 0))


def test_mentions_are_the_words_before_each_objects_first_reference_group():
    caption = 'A red square (<|Obj_0|>), a yellow circle (<|Obj_1|>, <|Obj_3|>) and a red square (<|Obj_2|>) on gray.'
    assert placeholder_mentions(caption) == {0: "A red square", 1: "a yellow circle", 3: "a yellow circle",
                                             2: "and a red square"}
    # a bare placeholder, a repeat (first group wins) and a group with no words before it
    assert placeholder_mentions('<|Obj_1|> next to the "cat" <|Obj_0|>; again <|Obj_1|>.') == {1: "", 0: 'next to the "cat'}
    assert placeholder_mentions("No objects.") == {}


def test_objects_sample_in_text_order_and_answers_are_built():
    template = 'A (<|Obj_2|>) and B (<|Obj_0|>, <|Obj_2|>); C <|Obj_1|>.'
    assert placeholder_ids(template) == [2, 0, 2, 1]
    cells = [[0, 1, 2, 3, 4, 5], [10, 11], [7, 8, 9, 12, 13]]
    picks = sample_object_vrts(template, cells, 5, sample_rng(1, 2, 3))
    assert list(picks) == [2, 0, 1]  # order of first placeholder
    rng = sample_rng(1, 2, 3)
    assert picks[2] == pick_cells(cells[2], 5, rng) and picks[0] == pick_cells(cells[0], 5, rng)
    text = build_answer(template, picks)
    vrt = lambda ks: "".join(f"<|VRT_{k}|>" for k in ks)
    assert text == f"A ({vrt(picks[2])}) and B ({vrt(picks[0])}, {vrt(picks[2])}); C {vrt(picks[1])}."
    assert build_answer("No objects.", {}) == "No objects."
    assert build_answer("x <|Obj_0|>", [[5, 6]]) == "x <|VRT_5|><|VRT_6|>"
    with pytest.raises(ValueError, match=r"no VRT picks for <\|Obj_1\|>"):
        build_answer("<|Obj_1|>", {0: [1]})


# --------------------------------------------------------------------------- foreground cells at the processor grid
def test_derived_cells_equal_stored_patches_at_the_same_grid(data_dir: Path):
    ds = PaDTDataset(str(data_dir / "train.json"), GEOMETRY, image_folders=str(data_dir / "images"))
    records = [json.loads(line) for line in (data_dir / "train.json").read_text().splitlines()]
    n_cells = 0
    for i, rec in enumerate(records):
        h, w = {**SIZES, "edge.png": (56, 84)}[rec["image"]]
        grid = merged_grid_for_image(h, w, patch_size=14, merge_size=2, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        assert grid == RELEASED_GRID.grid(h, w)  # precondition: the processor grid is the released grid
        item = ds[i]
        assert item["grid"] == grid
        for obj, stored in zip(item["objects"], rec["objects"]):
            assert obj["cells"] == stored["patches"] and not obj["fallback"]
            n_cells += len(obj["cells"])
    assert n_cells > 20


def test_cells_at_another_grid_follow_the_mask(tmp_path: Path):
    # 112 x 112 image, object = top-left 56 x 56 quarter: 4 x 4 grid -> cells {0, 1, 4, 5}
    _write_images(tmp_path, {"q.png": (112, 112)})
    quarter = np.zeros((112, 112), np.uint8)
    quarter[:56, :56] = 1
    rec = make_record(1, "q.png", "p", "<|Obj_0|> <|Obj_1|>", [_object("ovd", "q", (112, 112), mask=quarter),
                      _object("ovd", "b", (112, 112), box_xywh=[56, 56, 56, 56])], "ovd")
    path = _write_jsonl(tmp_path / "q.jsonl", [rec])
    same = PaDTDataset(str(path), GEOMETRY, image_folders=str(tmp_path))[0]
    assert same["grid"] == (4, 4) and [o["cells"] for o in same["objects"]] == [[0, 1, 4, 5], [10, 11, 14, 15]]
    # a processor limited to 56 x 56 pixels resizes the image to a 2 x 2 grid: one cell per quarter
    small = GridGeometry(14, 2, min_pixels=MIN_PIXELS, max_pixels=56 * 56)
    other = PaDTDataset(str(path), small, image_folders=str(tmp_path))[0]
    assert other["grid"] == (2, 2) and [o["cells"] for o in other["objects"]] == [[0], [3]]
    assert rec["objects"][0]["patches"] == [0, 1, 4, 5]  # the stored patches no longer apply
    # a finer grid (14-px patches, no merge): the quarter covers 4 x 4 of the 8 x 8 cells
    fine = GridGeometry(14, 1, min_pixels=14 * 14, max_pixels=MAX_PIXELS)
    cells = PaDTDataset(str(path), fine, image_folders=str(tmp_path))[0]["objects"][0]["cells"]
    assert cells == [r * 8 + c for r in range(4) for c in range(4)]


def test_object_without_foreground_cell_falls_back_to_box_centre(tmp_path: Path, caplog):
    _write_images(tmp_path, {"t.png": (112, 112)})
    mask = np.zeros((112, 112), np.uint8)
    mask[70, 30:40] = 1  # 10 px: under 1/28 of any cell
    assert foreground_cells(mask, 4, 4, cell_size=28, **FOREGROUND_RULES["ovd"].kwargs()) == []
    obj = {"bbox": [30 / 112, 70 / 112, 40 / 112, 71 / 112], "rle": rle_encode(mask), "label": "thin"}
    rec = make_record(1, "t.png", "p", "thin (<|Obj_0|>)", [obj], "ovd")
    path = _write_jsonl(tmp_path / "t.jsonl", [rec, rec])
    ds = PaDTDataset([DataSource(str(path), str(tmp_path), name="thin-set")], GEOMETRY)
    with caplog.at_level(logging.WARNING, logger="padt.data.dataset"):
        item = ds[0]
        ds[1]
    assert item["objects"][0]["cells"] == [2 * 4 + 1] and item["objects"][0]["fallback"]  # centre (35, 70.5)
    assert ds.fallback_report() == {"thin-set": {"objects": 2, "fallback": 2}}
    assert sum("no foreground cell" in r.getMessage() and "thin-set" in r.getMessage() for r in caplog.records) == 2


def test_tiny_images_are_upscaled_to_one_cell(tmp_path: Path):
    _write_images(tmp_path, {"tiny.png": (10, 20)})
    rec = make_record(1, "tiny.png", "p", "<|Obj_0|>", [{"bbox": [0.0, 0.0, 1.0, 1.0], "label": "all"}], "ovd")
    ds = PaDTDataset(str(_write_jsonl(tmp_path / "tiny.jsonl", [rec])), GEOMETRY, image_folders=str(tmp_path))
    item = ds[0]
    assert item["image"].size == (56, 28)  # short side 10 -> 28, long side scaled by 2.8
    gh, gw = item["grid"]
    assert (gh, gw) == GEOMETRY.grid(28, 56) and item["objects"][0]["cells"] == list(range(gh * gw))


def test_grid_geometry_from_processor():
    from padt.testing.tokenizer import build_tiny_processor

    proc = build_tiny_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert GridGeometry.from_processor(proc) == GEOMETRY
    assert GridGeometry.from_processor(proc.image_processor) == GEOMETRY
    with pytest.raises(TypeError):
        GridGeometry.from_processor(object())
    with pytest.raises(ValueError):
        GridGeometry(14, 0, 1, 2)
