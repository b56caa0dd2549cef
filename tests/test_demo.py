"""eval/test_demo.py on a tiny local checkpoint: files, sizes, schema, and clear messages for bad inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_quickstart import checkpoint  # noqa: F401 (fixture)

DEMO = Path(__file__).resolve().parent.parent / "eval" / "test_demo.py"


def _demo():
    spec = importlib.util.spec_from_file_location("padt_test_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_demo_writes_all_outputs(checkpoint, tmp_path, mode, capsys):  # noqa: F811
    path, image_path = checkpoint
    img = tmp_path / f"img_{mode}.png"
    Image.open(image_path).convert(mode).save(img)
    out = tmp_path / "out"
    code = _demo().main(["--model", str(path), "--image", str(img), "--task", "rec", "--query", "the thing",
                         "--out", str(out), "--device", "cpu", "--max-new-tokens", "5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Completion:" in printed and "object 0" in printed
    for name in ("pred_box.png", "mask_seg.png", "vrt_seg.png"):
        assert Image.open(out / name).size == (130, 90)
    text = (out / "completion.txt").read_text()
    assert text.startswith("Prompt: Please carefully check the image") and "\nCompletion: " in text
    record = json.loads((out / "predictions.json").read_text())
    assert set(record) >= {"prompt", "text", "objects", "image_size"} and record["image_size"] == [130, 90]
    obj = record["objects"][0]
    assert set(obj) == {"label", "box_xyxy", "score", "vrt_ids", "mask_rle"} and len(obj["box_xyxy"]) == 4
    assert obj["mask_rle"]["size"] == [90, 130] and isinstance(obj["mask_rle"]["counts"], str)
    vrt = np.asarray(Image.open(out / "vrt_seg.png"))
    assert vrt.std() > 0


def test_demo_bad_inputs_give_clear_messages(checkpoint, tmp_path, capsys):  # noqa: F811
    path, image_path = checkpoint
    demo = _demo()
    assert demo.main(["--model", str(path), "--image", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    assert demo.main(["--model", str(path), "--image", str(corrupt)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert demo.main(["--model", str(tmp_path / "no_model"), "--image", str(image_path)]) == 2
    assert "no_model" in capsys.readouterr().err


def test_demo_without_arguments_uses_the_shipped_model(tmp_path, capsys):
    demo = _demo()
    assert demo.DEFAULT_MODEL.is_dir() and demo.DEFAULT_IMAGE.is_file()
    assert demo.main(["--out", str(tmp_path), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert "Completion:" in capsys.readouterr().out
    assert Image.open(tmp_path / "vrt_seg.png").size == Image.open(demo.DEFAULT_IMAGE).size
