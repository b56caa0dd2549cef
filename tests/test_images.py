"""Images are read the same way everywhere: every PIL mode to the right RGB, EXIF orientation applied, clear errors
for a directory and for an aspect ratio over the processor's limit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_quickstart import checkpoint  # noqa: F401 (fixture)

from padt.evaluation.data import EvalSample, image_wh
from padt.geometry.images import read_image, to_rgb, upright_size
from padt.inference.demo import DemoApp
from padt.preprocess.common import image_size
from padt.preprocess.templates import make_record
from padt.processing.qwen import fetch_image, load_image

DEMO = Path(__file__).resolve().parent.parent / "eval" / "test_demo.py"


# --------------------------------------------------------------------------- modes
def _rgb(path_or_image) -> np.ndarray:
    img = load_image(path_or_image)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def test_16bit_png_keeps_its_gradient(tmp_path):
    values = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    values[:, 32] = 32768
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # I;16 with this Pillow
    rgb = _rgb(path)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, -1].tolist() == [255, 255, 255]
    assert abs(rgb[0, 32, 0] - 128) <= 1  # mid-grey 32768 -> ~128
    assert np.all(np.diff(rgb[0, :, 0]) >= 0) and len(np.unique(rgb[0, :, 0])) == 64  # still a gradient
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_mode_I_and_F_are_scaled():
    mid = Image.fromarray(np.full((4, 4), 32768, np.int32))
    assert mid.mode == "I" and _rgb(mid)[0, 0].tolist() == [128, 128, 128]  # 16-bit range
    wide = Image.fromarray(np.array([[-1000, 0], [99000, 200000]], np.int32))  # out of 0..65535: its own range
    assert _rgb(wide)[:, :, 0].tolist() == [[0, 1], [127, 255]]
    f = Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], np.float32))
    assert f.mode == "F" and _rgb(f)[:, :, 0].tolist() == [[0, 64], [128, 255]]  # 0..1 -> 0..255, not near-black
    f_nan = Image.fromarray(np.array([[np.nan, 2.0], [3.0, 4.0]], np.float32))
    assert _rgb(f_nan)[:, :, 0].tolist() == [[0, 0], [128, 255]]
    assert _rgb(Image.fromarray(np.full((2, 2), 7.0, np.float32)))[0, 0].tolist() == [0, 0, 0]  # constant: no NaN


def test_float_tiff_file(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[10.0, 20.0, 30.0]], np.float32)).save(path)
    assert _rgb(path)[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_palette_grey_and_bilevel(tmp_path):
    cmyk = tmp_path / "c.tif"
    Image.new("CMYK", (2, 2), (255, 0, 0, 0)).save(cmyk)
    assert _rgb(cmyk)[0, 0].tolist() == [0, 255, 255]  # full cyan
    assert _rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0)))[0, 0].tolist() == [255, 255, 255]
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    pal.save(path)
    assert _rgb(path)[0].tolist() == [[10, 20, 30], [200, 100, 50]]
    pal_t = tmp_path / "pt.png"
    pal.save(pal_t, transparency=0)  # colour 0 transparent -> white
    assert _rgb(pal_t)[0].tolist() == [[255, 255, 255], [200, 100, 50]]
    grey = tmp_path / "l.png"
    Image.new("L", (2, 2), 77).save(grey)
    assert _rgb(grey)[0, 0].tolist() == [77, 77, 77]
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    path = tmp_path / "b.png"
    bilevel.save(path)
    assert _rgb(path)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_transparent_images_are_composited_on_white(tmp_path):
    la = Image.new("LA", (2, 1), (0, 255))
    la.putpixel((1, 0), (0, 0))
    path = tmp_path / "la.png"
    la.save(path)
    assert _rgb(path)[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 0))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    path = tmp_path / "rgba.png"
    rgba.save(path)
    got = _rgb(path)[0].tolist()
    assert got[0] == [255, 0, 0] and got[1] == [255, 255, 255] and all(abs(v - 127) <= 1 for v in got[2])


def test_load_image_returns_a_new_image():
    src = Image.new("RGB", (4, 4), (1, 2, 3))
    assert load_image(src) is not src and to_rgb(src) is src


# --------------------------------------------------------------------------- EXIF orientation
def _rotated_jpeg(path: Path, orientation: int) -> Image.Image:
    """A JPEG stored 40x20 (w x h), red left half / blue right half, with an EXIF orientation tag; returns the
    upright image PIL's exif_transpose gives."""
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied_by_every_reader(tmp_path, orientation):
    path = tmp_path / "rot.jpg"
    expected = _rotated_jpeg(path, orientation)
    assert expected.size == (20, 40)
    top = (255, 0, 0) if orientation == 6 else (0, 0, 255)  # 6: turned 90 deg clockwise, the stored left edge on top
    for img in (load_image(path), load_image(Image.open(path)), load_image(f"file://{path}"), read_image(path)):
        assert img.size == (20, 40)
        assert np.abs(np.asarray(img).astype(int) - np.asarray(expected).astype(int)).max() < 40
        assert np.abs(np.asarray(img)[2, 10].astype(int) - top).max() < 40
    assert fetch_image({"image": str(path), "min_pixels": 4 * 784, "max_pixels": 16 * 784}).height > \
        fetch_image({"image": str(path), "min_pixels": 4 * 784, "max_pixels": 16 * 784}).width


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_in_header_sizes(tmp_path, orientation):
    path = tmp_path / "rot.jpg"
    _rotated_jpeg(path, orientation)
    assert upright_size(path) == (20, 40)
    Image.new("RGB", (40, 20)).save(tmp_path / "plain.jpg")
    assert upright_size(tmp_path / "plain.jpg") == (40, 20)


def test_exif_orientation_in_preprocessing_sizes(tmp_path):
    _rotated_jpeg(tmp_path / "rot.jpg", 6)
    assert image_size({}, tmp_path, "rot.jpg") == (40, 20)  # (height, width) from the header, upright


def test_exif_orientation_in_evaluation_sizes(tmp_path):
    path = tmp_path / "rot.jpg"
    _rotated_jpeg(path, 8)
    sample = EvalSample(0, [{"image": "rot.jpg", "objects": [{"bbox": [0, 0, 1, 1]}]}], path, "p")
    assert image_wh(sample, None) == (20, 40)  # (width, height) from the header when no RLE or prediction gives it


def test_exif_orientation_in_training_data(tmp_path):
    from padt.data import PaDTDataset
    from padt.geometry.grids import GridGeometry

    _rotated_jpeg(tmp_path / "rot.jpg", 6)
    rec = make_record(1, "rot.jpg", "p", "<|Obj_0|>", [{"bbox": [0.0, 0.0, 1.0, 1.0], "label": "all"}], "ovd")
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    geometry = GridGeometry(patch_size=14, merge_size=2, min_pixels=4 * 784, max_pixels=64 * 784)
    item = PaDTDataset(str(tmp_path / "d.jsonl"), geometry, image_folders=str(tmp_path), upscale_tiny=False)[0]
    assert item["image"].size == (20, 40) and np.asarray(item["image"])[2, 10, 0] > 200


class _SizePredictor:
    """Records the images it is given; returns an empty prediction."""

    def __init__(self):
        self.images = []

    def predict(self, images, prompts):
        from padt.inference.predictor import Prediction

        self.images += images
        return [Prediction(text="", objects=[], image_size=images[0].size)]


def test_exif_orientation_in_the_demo_app(tmp_path):
    path = tmp_path / "rot.jpg"
    _rotated_jpeg(path, 8)
    predictor = _SizePredictor()
    DemoApp(predictor, cell_size_px=28, spatial_merge_size=2).predict(str(path), "ric")
    assert predictor.images[0].size == (20, 40)


# --------------------------------------------------------------------------- bad inputs
def test_directory_as_image_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}.*is a directory"):
        load_image(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="is a directory"):
        upright_size(tmp_path)


def _demo_cli():
    spec = importlib.util.spec_from_file_location("padt_test_demo_images", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_directory_as_image_in_the_cli(tmp_path, capsys):
    demo = _demo_cli()
    assert demo.main(["--image", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and str(tmp_path) in err and len(err.strip().splitlines()) == 1


def test_extreme_aspect_ratio_is_a_clear_error(tmp_path):
    path = tmp_path / "thin.png"
    Image.new("RGB", (402, 2)).save(path)
    for src in (path, Image.open(path)):
        with pytest.raises(ValueError, match=r"402x2 .*aspect ratio 201\.0.*limit of 200"):
            load_image(src)
    with pytest.raises(ValueError, match="402x2"):
        fetch_image({"image": str(path)})
    assert load_image(path, max_aspect_ratio=None).size == (402, 2)
    assert load_image(Image.new("RGB", (400, 2))).size == (400, 2)  # exactly 200 is allowed


def test_cli_reads_rotated_and_16bit_images_upright(checkpoint, tmp_path, capsys):  # noqa: F811
    model, _ = checkpoint
    demo = _demo_cli()
    rotated = tmp_path / "rot.jpg"
    _rotated_jpeg(rotated, 6)
    deep = tmp_path / "g16.png"
    Image.fromarray(np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1))).save(deep)
    for path, size in ((rotated, [20, 40]), (deep, [40, 30])):
        out = tmp_path / path.stem
        assert demo.main(["--model", str(model), "--image", str(path), "--out", str(out), "--device", "cpu",
                          "--max-new-tokens", "3"]) == 0, capsys.readouterr().err
        assert json.loads((out / "predictions.json").read_text())["image_size"] == size
        assert Image.open(out / "pred_box.png").size == tuple(size)
    drawn = np.asarray(Image.open(tmp_path / "g16" / "pred_box.png").convert("L")).astype(int)
    assert drawn[-1, 0] < 20 and drawn[-1, -1] > 235  # the gradient survives (the old reading was all white)
