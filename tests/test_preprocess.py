"""Raw annotations -> PaDT JSONL: hand-made COCO / REFER / RIC / custom fixtures, checked field by field."""

from __future__ import annotations

import importlib.util
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from rle_helpers import uncompressed_rle

from padt.geometry.grids import merged_grid_for_image
from padt.geometry.masks import FOREGROUND_RULES, foreground_cells, rle_decode, rle_encode
from padt.preprocess import (
    GridSpec,
    OVDOptions,
    ReferDataset,
    SkipReport,
    caption_to_template,
    iter_jsonl,
    load_coco_instances,
    load_plain_pickle,
    ovd_records,
    refer_records,
    ric_records,
)
from padt.preprocess.templates import ovd_answer, ovd_prompt, rec_answer, rec_prompt

pytest.importorskip("cv2")
SCRIPTS = Path(__file__).resolve().parents[1] / "src" / "preprocess"
GRID = GridSpec(patch_size=14, merge_size=2)  # the released data's rounded grid, 28-px cells
RECORD_KEYS = ["id", "image", "conversations", "answer_template", "objects", "task"]
OBJECT_KEYS = ["patches", "bbox", "iscrowd", "area", "rle", "label"]
NO_FG = "no foreground cell at the merged grid"
CATS = ["cat", "dog", "bird", "horse", "sheep", "cow", "zebra", "giraffe"]


# --------------------------------------------------------------------------- fixtures
def _mask(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[rows, cols] = 1
    return m


# Image 1 is 56 x 84 px: a 2 x 3 grid of 28-px cells, so the grid resize is the identity and cells are exact.
CELL01 = _mask(56, 84, slice(0, 28), slice(28, 56))  # full cell (0, 1) -> patch 1
CELL10 = _mask(56, 84, slice(28, 56), slice(0, 28))  # full cell (1, 0) -> patch 3
EDGE28 = _mask(56, 84, slice(0, 1), slice(56, 84))  # 28 px = exactly 1/28 of cell (0, 2): kept by >=, not by >
TINY10 = _mask(56, 84, slice(40, 41), slice(60, 70))  # 10 px: no cell
POLY = [[60, 32, 80, 32, 80, 52, 60, 52]]  # inside cell (1, 2) -> patch 5


def _image1_annotations() -> list[dict]:
    return [
        {"id": 101, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 784.0, "bbox": [28, 0, 28, 28],
         "segmentation": rle_encode(CELL01)},
        {"id": 102, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 400.0, "bbox": [60, 32, 20, 20],
         "segmentation": POLY},
        {"id": 103, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 784.0, "bbox": [0, 28, 28, 28],
         "segmentation": uncompressed_rle(CELL10)},
        {"id": 104, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 28.0, "bbox": [56, 0, 28, 1],
         "segmentation": rle_encode(EDGE28)},
        {"id": 105, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 10.0, "bbox": [60, 40, 10, 1],
         "segmentation": rle_encode(TINY10)},
    ]


def _coco_dict() -> dict:
    anns = _image1_annotations()
    anns.append({"id": 201, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 100.0, "bbox": [0, 0, 10, 10],
                 "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]})
    # image 4: detection-only boxes (no segmentation): 1 cat and 3 dogs
    for i, (cat, box) in enumerate([(1, [0, 0, 28, 28]), (2, [28, 0, 28, 28]), (2, [0, 28, 28, 28]),
                                    (2, [28, 28, 28, 28])]):
        anns.append({"id": 401 + i, "image_id": 4, "category_id": cat, "iscrowd": 0, "area": 784.0, "bbox": box})
    return {
        "images": [
            {"id": 1, "file_name": "000000000001.jpg", "height": 56, "width": 84},
            {"id": 2, "file_name": "000000000002.jpg", "height": 1300, "width": 100},
            {"id": 3, "file_name": "000000000003.jpg", "height": 84, "width": 56},
            {"id": 4, "file_name": "000000000004.jpg", "height": 56, "width": 56},
        ],
        "annotations": anns,
        "categories": [{"id": i + 1, "name": n, "supercategory": "animal"} for i, n in enumerate(CATS)][::-1],
    }


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    ann_dir = tmp_path / "annotations"
    ann_dir.mkdir()
    for split in ("train2017", "val2017"):
        (ann_dir / f"instances_{split}.json").write_text(json.dumps(_coco_dict()))
    return ann_dir


def _run_script(name: str, *argv) -> int:
    spec = importlib.util.spec_from_file_location(f"_padt_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv] + ["--no-progress"])


def _read(path: Path) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]


def _obj(patches, bbox_xywh, iscrowd, area, mask, label, hw=(56, 84)) -> dict:
    h, w = hw
    x, y, bw, bh = bbox_xywh
    obj = {"patches": patches, "bbox": [x / w, y / h, (x + bw) / w, (y + bh) / h], "iscrowd": iscrowd, "area": area}
    if mask is not None:
        obj["rle"] = rle_encode(mask)
    obj["label"] = label
    return obj


# --------------------------------------------------------------------------- templates
def test_prompt_and_answer_templates():
    assert ovd_prompt(["cat", "hot dog"]) == (
        'Please carefully check the image and detect the following objects: ["cat", "hot dog"].'
    )
    assert ovd_answer([]) == "No objects from the list are present in the image."
    assert ovd_answer([("cat", 1)]) == 'There is 1 "cat" (<|Obj_0|>) in this image.'
    assert ovd_answer([("person", 3)]) == 'There are 3 "person" (<|Obj_0|>, <|Obj_1|>, <|Obj_2|>) in this image.'
    assert ovd_answer([("motorcycle", 1), ("bicycle", 1), ("person", 2)]) == (
        'In this image, there are 1 "motorcycle" (<|Obj_0|>), 1 "bicycle" (<|Obj_1|>), '
        '2 "person" (<|Obj_2|>, <|Obj_3|>).'
    )
    assert rec_prompt("the car on the left") == (
        'Please carefully check the image and detect the object this sentence describes: "the car on the left".'
    )
    assert rec_answer("the car on the left") == 'The "the car on the left" refers to <|Obj_0|> in this image.'


# --------------------------------------------------------------------------- COCO / OVD
def test_process_coco_val_records_field_by_field(coco_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run_script("process_coco", "--ann-dir", coco_dir, "--output-dir", out, "--splits", "val2017") == 0
    rows = _read(out / "instances_val2017.json")
    assert [r["id"] for r in rows] == [1, 3, 4]  # image 2 (1300 px side) skipped
    r1 = rows[0]
    assert list(r1) == RECORD_KEYS
    assert r1["image"] == "000000000001.jpg" and r1["task"] == "ovd"
    assert r1["conversations"] == [{"from": "human", "value": ovd_prompt(CATS)}]  # category-id order
    assert r1["answer_template"] == 'In this image, there are 2 "cat" (<|Obj_0|>, <|Obj_1|>), 2 "dog" (<|Obj_2|>, <|Obj_3|>).'
    assert r1["objects"] == [
        _obj([1], [28, 0, 28, 28], 0, 784.0, CELL01, "cat"),
        _obj([3], [0, 28, 28, 28], 1, 784.0, CELL10, "cat"),  # crowd region kept, RLE recompressed
        _obj([5], [60, 32, 20, 20], 0, 400.0, _polygon_mask(), "dog"),  # polygon -> RLE via pycocotools
        _obj([2], [56, 0, 28, 1], 0, 28.0, EDGE28, "dog"),  # exactly 1/28 coverage: kept by the OVD >= rule
    ]
    assert all(list(o) == OBJECT_KEYS for o in r1["objects"])
    assert rows[1]["answer_template"] == "No objects from the list are present in the image."
    assert rows[1]["objects"] == []
    r4 = rows[2]
    assert r4["answer_template"] == 'In this image, there are 1 "cat" (<|Obj_0|>), 3 "dog" (<|Obj_1|>, <|Obj_2|>, <|Obj_3|>).'
    # detection-only annotations: box-shaped cells, no rle
    assert [o["patches"] for o in r4["objects"]] == [[0], [1], [2], [3]]
    assert all("rle" not in o and list(o) == ["patches", "bbox", "iscrowd", "area", "label"] for o in r4["objects"])
    err = capsys.readouterr().err
    assert "wrote 3 records" in err and "image side over --max-side (1288 px)" in err and NO_FG in err


def _polygon_mask() -> np.ndarray:
    from pycocotools import mask as mask_api

    return mask_api.decode(mask_api.merge(mask_api.frPyObjects(POLY, 56, 84)))


def test_ovd_skip_counts_and_per_class_limit(coco_dir):
    coco = load_coco_instances(coco_dir / "instances_val2017.json")
    report = SkipReport()
    rows = list(ovd_records(coco, options=OVDOptions(shuffle=False, max_per_class=2), grid=GRID,
                            rule=FOREGROUND_RULES["ovd"], rng=np.random.default_rng(0), report=report))
    assert report.to_dict() == {
        "written": 3,
        "skipped_records": {"image side over --max-side (1288 px)": 1},
        "dropped_objects": {"category over --max-per-class (2) in the image": 3, NO_FG: 1},
        "notes": {"object without segmentation: box-shaped cells, no rle": 1},
    }
    r4 = rows[2]
    assert r4["conversations"][0]["value"] == ovd_prompt([c for c in CATS if c != "dog"])
    assert r4["answer_template"] == 'There is 1 "cat" (<|Obj_0|>) in this image.'


def test_ovd_training_order_is_seeded_and_drops_only_absent(coco_dir):
    coco = load_coco_instances(coco_dir / "instances_train2017.json")

    def prompts(seed: int, drop_rate: float) -> list[list[str]]:
        rows = ovd_records(coco, options=OVDOptions(shuffle=True, drop_rate=drop_rate), grid=GRID,
                           rule=FOREGROUND_RULES["ovd"], rng=np.random.default_rng(seed), report=SkipReport())
        return [json.loads(r["conversations"][0]["value"].split(": ", 1)[1][:-1]) for r in rows]

    full, dropped = prompts(3, 0.0), prompts(3, 1.0)
    assert full == prompts(3, 0.0) and full != prompts(4, 0.0)
    assert all(sorted(p) == sorted(CATS) for p in full)
    present = [{"cat", "dog", "bird"}, set(), {"cat", "dog"}]  # images 1, 3, 4 (raw annotations)
    for order, kept, here in zip(full, dropped, present):
        absent = [c for c in order if c not in here]
        assert kept == [c for c in order if c not in absent[: len(CATS) // 2]]  # first half-count absent dropped
        assert here <= set(kept)


def test_coco_cli_deterministic_per_seed(coco_dir, tmp_path):
    outs = []
    for i, seed in enumerate([0, 0, 1]):
        out = tmp_path / f"o{i}"
        assert _run_script("process_coco", "--ann-dir", coco_dir, "--output-dir", out, "--seed", seed) == 0
        outs.append((out / "instances_train2017.json").read_bytes())
        assert (out / "instances_val2017.json").exists()
    assert outs[0] == outs[1]
    prompts = [[json.loads(line)["conversations"][0]["value"] for line in o.splitlines()] for o in outs]
    assert prompts[0] != prompts[2]


def test_stored_patches_are_reproducible_from_rle_at_the_processor_grid(coco_dir, tmp_path):
    """What the training-data reader does: decode rle, foreground_cells at the processor's grid."""
    out = tmp_path / "out"
    assert _run_script("process_coco", "--ann-dir", coco_dir, "--output-dir", out, "--splits", "val2017") == 0
    sizes = {img["id"]: (img["height"], img["width"]) for img in _coco_dict()["images"]}
    checked = 0
    for row in _read(out / "instances_val2017.json"):
        gh, gw = merged_grid_for_image(*sizes[row["id"]], patch_size=14, merge_size=2, min_pixels=3136,
                                       max_pixels=12845056)
        for obj in (o for o in row["objects"] if "rle" in o):
            cells = foreground_cells(rle_decode(obj["rle"]), gh, gw, cell_size=28,
                                     **FOREGROUND_RULES[row["task"]].kwargs())
            assert cells == obj["patches"]
            checked += 1
    assert checked == 4
    # another grid through the CLI: a larger min_pixels doubles image 1's grid to 4 x 6
    out2 = tmp_path / "out2"
    assert _run_script("process_coco", "--ann-dir", coco_dir, "--output-dir", out2, "--splits", "val2017",
                       "--grid", "processor", "--min-pixels", 4 * 56 * 84) == 0
    r1 = _read(out2 / "instances_val2017.json")[0]
    assert r1["objects"][0]["patches"] == [2, 3, 8, 9]
    assert r1["objects"][0]["patches"] == foreground_cells(CELL01, 4, 6, cell_size=28,
                                                           **FOREGROUND_RULES["ovd"].kwargs())


def test_convert_coco_format_detection_only(tmp_path):
    data = {
        "images": [{"id": "a", "file_name": "a.png", "height": 56, "width": 56}],
        "annotations": [{"image_id": "a", "category_id": 7, "bbox": [0, 0, 56, 28], "iscrowd": 0}],
        "categories": [{"id": 7, "name": "widget"}, {"id": 9, "name": "gadget"}],
    }
    ann = tmp_path / "det.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "det.jsonl"
    assert _run_script("convert_coco_format", "--annotations", ann, "--output", out, "--prompt-order", "id") == 0
    (row,) = _read(out)
    assert row["conversations"][0]["value"] == ovd_prompt(["widget", "gadget"])
    assert row["answer_template"] == 'There is 1 "widget" (<|Obj_0|>) in this image.'
    assert row["objects"] == [{"patches": [0, 1], "bbox": [0.0, 0.0, 1.0, 0.5], "iscrowd": 0, "area": 1568.0,
                               "label": "widget"}]


def test_missing_and_malformed_inputs_name_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert _run_script("process_coco", "--ann-dir", missing, "--output-dir", tmp_path / "o", "--splits", "val2017") == 2
    assert str(missing / "instances_val2017.json") in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "instances_val2017.json").write_text('{"images": [}\n')
    assert _run_script("process_coco", "--ann-dir", bad, "--output-dir", tmp_path / "o", "--splits", "val2017") == 2
    err = capsys.readouterr().err
    assert "malformed JSON" in err and str(bad / "instances_val2017.json") in err and "line 1" in err
    (bad / "x.jsonl").write_text('{"image": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"x\.jsonl at line 2"):
        list(iter_jsonl(bad / "x.jsonl"))
    (bad / "instances_val2017.json").write_text('{"images": [{"id": 1}], "annotations": [], "categories": []}')
    with pytest.raises(ValueError, match=r"images\[0\] needs 'id' and 'file_name'"):
        load_coco_instances(bad / "instances_val2017.json")


# --------------------------------------------------------------------------- REFER / RefCOCO
class U(str):
    """A Python-2 ``unicode`` string in the hand-written pickle (the rest are Python-2 byte strings)."""


def _py2_pickle(obj) -> bytes:
    """Protocol-2 pickle with Python-2 opcodes (SHORT_BINSTRING / BINSTRING for str), like the REFER files."""
    out = bytearray(b"\x80\x02")

    def enc(o):
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                enc(k)
                enc(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                enc(v)
            out.extend(b"e")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, U):
            data = o.encode("utf-8")
            out.extend(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(o, str):
            data = o.encode("utf-8")
            out.extend((b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data)
        else:
            raise TypeError(type(o))

    enc(obj)
    out.extend(b".")
    return bytes(out)


def _sent(i: int, text: str) -> dict:
    return {"tokens": text.split(), "raw": U(text.capitalize() + "."), "sent_id": i, "sent": text}


def _ref(ref_id: int, ann_id: int, split: str, sents: list[str]) -> dict:
    return {"sent_ids": list(range(len(sents))), "file_name": f"COCO_train2014_000000000001_{ann_id}.jpg",
            "ann_id": ann_id, "ref_id": ref_id, "image_id": 1, "split": split, "category_id": 1,
            "sentences": [_sent(ref_id * 10 + i, s) for i, s in enumerate(sents)]}


@pytest.fixture
def refer_root(tmp_path: Path) -> Path:
    folder = tmp_path / "refer" / "refcoco"
    folder.mkdir(parents=True)
    refs = [
        _ref(0, 101, "train", ["left cat", "cat on top"]),
        _ref(1, 104, "train", ["thin line"]),  # 1/28 coverage: not foreground under the strict RefCOCO rule
        _ref(2, 102, "val", ["the dog"]),
        _ref(3, 999, "train", ["ghost"]),  # annotation missing from instances.json
        _ref(4, 102, "testA", ["dog a"]),
        _ref(5, 102, "testB", [""]),  # empty sentence
    ]
    (folder / "refs(unc).p").write_bytes(_py2_pickle(refs))
    inst = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 56, "width": 84}],
            "annotations": _image1_annotations(), "categories": [{"id": 1, "name": "cat"}]}
    (folder / "instances.json").write_text(json.dumps(inst))
    return tmp_path / "refer"


def test_process_refcoco_records_and_counts(refer_root, tmp_path):
    out = tmp_path / "rec"
    report_json = tmp_path / "report.json"
    assert _run_script("process_refcoco", "--refer-root", refer_root, "--datasets", "refcoco", "--output-dir", out,
                       "--report-json", report_json) == 0
    train = _read(out / "refcoco_train.json")
    assert [r["objects"][0]["label"] for r in train] == ["left cat", "cat on top"]
    rec = train[0]
    assert list(rec) == RECORD_KEYS
    assert rec == {
        "id": 1,
        "image": "COCO_train2014_000000000001.jpg",
        "conversations": [{"from": "human", "value":
                           'Please carefully check the image and detect the object this sentence describes: "left cat".'}],
        "answer_template": 'The "left cat" refers to <|Obj_0|> in this image.',
        "objects": [_obj([1], [28, 0, 28, 28], 0, 784.0, CELL01, "left cat")],
        "task": "refering",
    }
    assert [r["objects"][0]["patches"] for r in _read(out / "refcoco_val.json")] == [[5]]
    assert len(_read(out / "refcoco_testA.json")) == 1 and _read(out / "refcoco_testB.json") == []
    counts = json.loads(report_json.read_text())
    assert counts["refcoco_train"]["written"] == 2
    assert counts["refcoco_train"]["skipped_records"] == {NO_FG: 1, "ref annotation missing from instances.json": 1}
    assert counts["refcoco_testB"]["skipped_records"] == {"sentence without a non-empty 'sent'": 1}


def test_refer_reader_decodes_python2_strings(refer_root):
    refer = ReferDataset.load(refer_root, "refcoco", "unc")
    assert refer.split_names() == ["testA", "testB", "train", "val"]
    ref = refer.refs_for_split("train")[0]
    assert ref["sentences"][0]["raw"] == "Left cat." and isinstance(ref["sentences"][0]["sent"], str)
    report = SkipReport()
    rows = list(refer_records(refer, "val", grid=GRID, rule=FOREGROUND_RULES["refering"], report=report))
    assert rows[0]["objects"][0]["label"] == "the dog" and report.written == 1
    with pytest.raises(ValueError, match="no refs in split 'test'"):
        list(refer_records(refer, "test", grid=GRID, rule=FOREGROUND_RULES["refering"], report=report))
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p"):
        ReferDataset.load(refer_root, "refcoco", "umd")


class _Evil:
    def __reduce__(self):
        return (print, ("PWNED",))


def test_pickle_loader_refuses_globals(tmp_path, capsys):
    path = tmp_path / "refs(unc).p"
    for protocol, module in [(2, "__builtin__"), (4, "builtins")]:
        path.write_bytes(pickle.dumps([{"sent": "ok"}, _Evil()], protocol=protocol))
        with pytest.raises(pickle.UnpicklingError, match=rf"refusing to load '{module}\.print'") as info:
            load_plain_pickle(path)
        assert str(path) in str(info.value)
    assert "PWNED" not in capsys.readouterr().out
    path.write_bytes(pickle.dumps({"a": [1, 2.5, None, True, ("t",)]}, protocol=4))
    assert load_plain_pickle(path) == {"a": [1, 2.5, None, True, ("t",)]}


# --------------------------------------------------------------------------- RIC
RIC_CAPTIONS = [
    ("A cat (<box_id: 101/>) sits next to a dog (<box_id: 102/>).",
     "A cat (<|Obj_0|>) sits next to a dog (<|Obj_1|>).", [101, 102]),
    ("Two cats (<box_id: #101/>, <box_id: 103) and a dog (102).",
     "Two cats (<|Obj_0|>, <|Obj_1|>) and a dog (<|Obj_2|>).", [101, 103, 102]),
    ("Cats (<box_id: 101, 103/>) and a bird (<box_id: 201/>).", "Cats (<|Obj_0|>, <|Obj_1|>) and a bird.", [101, 103]),
    ("A tiny bird (<box_id: 105/>, <box_id: 101/>) here.", "A tiny bird (<|Obj_0|>) here.", [101]),
    ("No ending (<box_id: 101/>)", None, None),
    ('A cat (<box_id: />) and (box_id: abc) said "meow"', 'A cat and said "meow"', []),
    ("Broken <box_id: 101 tail words.", None, None),
    ("(3) cats and a dog (<box_id: 102/>).", "(3) cats and a dog (<|Obj_0|>).", [102]),
    ("Adjacent (<box_id: 101/><box_id: 102/>).", "Adjacent (<|Obj_0|>, <|Obj_1|>).", [101, 102]),
    (42, None, None),
]


@pytest.fixture
def ric_dir(tmp_path: Path) -> Path:
    data = _coco_dict()
    data["images"][0]["captions"] = [c for c, _, _ in RIC_CAPTIONS]
    data["images"][3]["captions"] = ["Boxes (<box_id: 401/>, <box_id: 402/>)."]
    folder = tmp_path / "ric"
    folder.mkdir()
    (folder / "ric_instances_val2017.json").write_text(json.dumps(data))
    return folder


def test_process_ric_templates_objects_and_counts(ric_dir, tmp_path, capsys):
    out = tmp_path / "ric_out"
    report_json = tmp_path / "ric_report.json"
    assert _run_script("process_ric", "--ann-dir", ric_dir, "--splits", "val2017", "--output-dir", out,
                       "--report-json", report_json) == 0
    rows = _read(out / "ric_instances_val2017.json")
    expected = [(t, ids) for _, t, ids in RIC_CAPTIONS if t is not None]
    assert [r["answer_template"] for r in rows[:-1]] == [t for t, _ in expected]
    by_id = {a["id"]: a for a in _image1_annotations()}
    for row, (_, ids) in zip(rows, expected):
        assert list(row) == RECORD_KEYS and row["task"] == "ric" and row["id"] == 1
        assert row["conversations"] == [{"from": "human", "value": "Please describe this image."}]
        assert [o["label"] for o in row["objects"]] == [""] * len(ids)
        assert [o["bbox"] for o in row["objects"]] == [
            [b[0] / 84, b[1] / 56, (b[0] + b[2]) / 84, (b[1] + b[3]) / 56] for b in (by_id[i]["bbox"] for i in ids)
        ]
    assert rows[0]["objects"][0] == _obj([1], [28, 0, 28, 28], 0, 784.0, CELL01, "")
    assert [o["patches"] for o in rows[1]["objects"]] == [[1], [3], [5]]
    assert rows[1]["objects"][1]["iscrowd"] == 1
    assert rows[-1]["answer_template"] == "Boxes (<|Obj_0|>, <|Obj_1|>)." and rows[-1]["id"] == 4
    counts = json.loads(report_json.read_text())["val2017"]
    assert counts["written"] == 8
    assert counts["skipped_records"] == {
        "caption does not end with '.' or a closing quote": 1,
        "caption with an unrepairable box_id tag": 1,
        "caption is not a string": 1,
    }
    assert counts["dropped_objects"] == {"tag: annotation id not in this image": 1, f"tag: {NO_FG}": 1}
    assert counts["notes"]["tag repaired: junk around the id removed"] == 1
    assert counts["notes"]["tag repaired: missing closing bracket"] == 1
    assert counts["notes"]["tag repaired: comma-joined ids split"] == 1
    assert counts["notes"]["bare annotation id in parentheses turned into a tag"] == 1
    assert counts["notes"]["tag repaired: adjacent tags separated"] == 1
    assert counts["notes"]["tag without an id removed"] == 1
    assert counts["notes"]["malformed (box_id...) group stripped"] == 1
    assert "caption with an unrepairable box_id tag" in capsys.readouterr().err


def test_caption_to_template_keeps_numbering_dense():
    objs = {1: ({"patches": [0]}, None), 2: (None, "no foreground cell"), 3: ({"patches": [1]}, None)}
    report = SkipReport()
    text, objects = caption_to_template(
        "X (<box_id: 2/>, <box_id: 1/>) and Y (<box_id: 2/>) and Z (<box_id: 3/>).", objs.__getitem__, {1, 2, 3},
        report,
    )
    assert text == "X (<|Obj_0|>) and Y and Z (<|Obj_1|>)."
    assert objects == [{"patches": [0]}, {"patches": [1]}]
    assert report.objects == {"tag: no foreground cell": 2}


def test_ric_records_library_call_matches_cli(ric_dir, tmp_path):
    coco = load_coco_instances(ric_dir / "ric_instances_val2017.json")
    report = SkipReport()
    rows = list(ric_records(coco, grid=GRID, rule=FOREGROUND_RULES["ric"], report=report))
    out = tmp_path / "o"
    assert _run_script("process_ric", "--ann-dir", ric_dir, "--splits", "val2017", "--output-dir", out) == 0
    assert rows == _read(out / "ric_instances_val2017.json") and report.written == len(rows)


# --------------------------------------------------------------------------- custom referring JSONL
def test_convert_referring_jsonl(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (84, 56), (120, 30, 30)).save(images / "a.png")  # width 84, height 56
    lines = [
        {"image": "a.png", "sentence": "the left square", "bbox": [28, 0, 56, 28]},
        {"image": "a.png", "sentences": ["red thing", "the thing"], "mask": rle_encode(CELL10), "id": 7},
        {"image": "a.png", "sentence": "poly", "mask": POLY, "height": 56, "width": 84},
        {"image": "missing.png", "sentence": "x", "bbox": [0, 0, 10, 10]},
        {"image": "a.png", "bbox": [0, 0, 10, 10]},
        {"image": "a.png", "sentence": "tiny", "bbox": [0, 0, 2, 2]},
    ]
    src = tmp_path / "refs.jsonl"
    src.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "refs_out.jsonl"
    report_json = tmp_path / "r.json"
    assert _run_script("convert_referring_jsonl", "--input", src, "--output", out, "--image-root", images,
                       "--report-json", report_json) == 0
    rows = _read(out)
    assert [r["id"] for r in rows] == [1, 7, 7, 3]
    assert rows[0] == {
        "id": 1, "image": "a.png",
        "conversations": [{"from": "human", "value": rec_prompt("the left square")}],
        "answer_template": rec_answer("the left square"),
        "objects": [_obj([1], [28, 0, 28, 28], 0, 784.0, None, "the left square")],
        "task": "refering",
    }
    assert rows[1]["objects"] == [_obj([3], [0, 28, 28, 28], 0, 784.0, CELL10, "red thing")]
    assert rows[2]["objects"][0]["label"] == "the thing" and rows[3]["objects"][0]["patches"] == [5]
    assert json.loads(report_json.read_text())["output"]["skipped_records"] == {
        "image file not found under --image-root": 1,
        "line without 'sentence' or 'sentences'": 1,
        NO_FG: 1,
    }
    # xywh boxes
    src.write_text(json.dumps({"image": "a.png", "sentence": "s", "bbox": [28, 0, 28, 28]}) + "\n")
    assert _run_script("convert_referring_jsonl", "--input", src, "--output", out, "--image-root", images,
                       "--bbox-format", "xywh") == 0
    assert _read(out)[0]["objects"][0]["patches"] == [1]


def test_convert_referring_jsonl_counts_every_skipped_line(tmp_path):
    """A line with an empty "sentences" list is a skip that is counted, not a silent drop."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (84, 56), (120, 30, 30)).save(images / "a.png")
    lines = [
        {"image": "a.png", "sentences": [], "bbox": [28, 0, 56, 28]},
        {"image": "a.png", "sentences": ["ok", ""], "bbox": [28, 0, 56, 28]},
    ]
    src = tmp_path / "refs.jsonl"
    src.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out, report_json = tmp_path / "o.jsonl", tmp_path / "r.json"
    assert _run_script("convert_referring_jsonl", "--input", src, "--output", out, "--image-root", images,
                       "--report-json", report_json) == 0
    assert [r["objects"][0]["label"] for r in _read(out)] == ["ok"]
    assert json.loads(report_json.read_text())["output"]["skipped_records"] == {
        "empty 'sentences' list": 1,
        "empty or non-string sentence": 1,
    }
