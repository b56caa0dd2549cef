"""The Gradio demo: prompts of the presets, the prediction function's drawings, and a local smoke test of the app."""

from __future__ import annotations

import importlib.util
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from padt.inference.demo import TASK_PRESETS, DemoApp, build_prompt, launch
from padt.inference.predictor import PredictedObject, Prediction
from padt.preprocess.templates import RIC_PROMPT, ovd_prompt, rec_prompt

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "padt" / "assets" / "tiny_default"


class BoxPredictor:
    """A predictor stub: one object with a known box, mask and VRT cell, and a completion echoing the prompt."""

    def __init__(self):
        self.prompts = []

    def predict(self, images, prompts):
        self.prompts += prompts
        w, h = images[0].size
        mask = np.zeros((h, w), bool)
        mask[10:30, 20:60] = True
        obj = PredictedObject("car", [3], [20.0, 10.0, 60.0, 30.0], [0.4, 0.2, 0.4, 0.2], 0.8, mask)
        return [Prediction(f"echo: {prompts[0]}", [obj], (w, h), (1, 4, 10))]


def _image(w=100, h=50):
    return Image.fromarray(np.full((h, w, 3), 128, np.uint8))


def test_build_prompt_presets():
    labels = {v: k for k, v in TASK_PRESETS.items()}
    assert build_prompt(labels["rec"], "the red car") == rec_prompt("the red car")
    assert build_prompt("ovd", "cat, dog ,") == ovd_prompt(["cat", "dog"])
    assert build_prompt("ric") == RIC_PROMPT
    assert build_prompt("rec", "ignored", "  my own prompt ") == "my own prompt"
    for task, query, match in [("rec", "", "sentence"), ("ovd", " , ", "category"), ("custom", "", "prompt"),
                               ("xyz", "q", "unknown task")]:
        with pytest.raises(ValueError, match=match):
            build_prompt(task, query)


def test_predict_fn_returns_the_drawings():
    stub = BoxPredictor()
    app = DemoApp(stub, cell_size_px=28, spatial_merge_size=2)
    completion, boxes, masks, cells = app.predict(_image(), "rec", "the car")
    assert completion == f"echo: {rec_prompt('the car')}"
    assert boxes.size == masks.size == cells.size == (100, 50)
    boxes, masks, cells = (np.asarray(im) for im in (boxes, masks, cells))
    assert tuple(boxes[20, 59]) == (255, 0, 0) and tuple(boxes[40, 90]) == (128, 128, 128)  # red box edge, untouched
    assert tuple(masks[20, 40]) == (255, 0, 0) and masks[40, 90].sum() == 0  # first palette colour inside the mask
    # VRT cell 3 on a 2 x 5 merged grid is column 3 of row 0: x in [60, 80), y in [0, 25)
    assert not np.array_equal(cells[5, 70], cells[40, 10])
    with pytest.raises(ValueError, match="upload an image"):
        app.predict(None, "ric", "")
    with pytest.raises(ValueError, match="cell_size_px"):
        DemoApp(stub)


def test_predict_fn_with_the_tiny_model():
    app = DemoApp.from_pretrained(TINY, device="cpu", max_new_tokens=48)
    completion, boxes, masks, cells = app.predict(Image.open(TINY / "sample.png"), "ric", "")
    assert "<|VRT_" in completion
    assert boxes.size == masks.size == cells.size == Image.open(TINY / "sample.png").size
    assert np.asarray(masks).any()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_app_starts_and_answers_on_localhost(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client, handle_file

    stub = BoxPredictor()
    port = _free_port()
    t0 = time.monotonic()
    demo = launch(DemoApp(stub, cell_size_px=28, spatial_merge_size=2), port=port, block=False, quiet=True)
    url = demo.local_url
    try:
        assert url.startswith(f"http://127.0.0.1:{port}") and demo.share_url is None
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200 and b"<html" in resp.read(4096).lower()
        image = tmp_path / "img.png"
        _image().save(image)
        client = Client(url, verbose=False)
        completion, *paths = client.predict(handle_file(str(image)), "OVD: detect categories (comma-separated)",
                                            "car, bus", "", api_name="/predict")
        assert completion == f"echo: {ovd_prompt(['car', 'bus'])}"
        assert len(paths) == 3 and all(Image.open(p).size == (100, 50) for p in paths)
        assert time.monotonic() - t0 < 150
    finally:
        demo.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)


def test_cli_defaults_to_localhost(monkeypatch):
    import padt.inference.demo

    spec = importlib.util.spec_from_file_location("padt_gradio_cli", ROOT / "eval" / "gradio_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = {}
    monkeypatch.setattr(padt.inference.demo.DemoApp, "from_pretrained", classmethod(lambda cls, *a, **k: "app"))
    monkeypatch.setattr(padt.inference.demo, "launch", lambda app, **kw: calls.update(app=app, **kw))
    assert module.main([]) == 0
    assert calls == {"app": "app", "host": "127.0.0.1", "port": 7860}
