"""The README's quick-start runs exactly as written, on the shipped default model, and gives sensible values.

The block tested is the first ```python block under the README's "## Quick start" heading. It is executed unchanged,
in a fresh namespace, with the repository root as the working directory (its paths are relative to it), on CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SAMPLE = ROOT / "padt" / "assets" / "tiny_default" / "sample.png"


def quick_start_block() -> str:
    """The first ```python block of the README's "## Quick start" section."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quick start[^\n]*\n(.*?)(?=^## |\Z)", text, flags=re.DOTALL | re.MULTILINE)
    if section is None:
        pytest.fail("README.md has no '## Quick start' section")
    block = re.search(r"^```python\n(.*?)^```", section.group(1), flags=re.DOTALL | re.MULTILINE)
    if block is None:
        pytest.fail("the README's '## Quick start' section has no ```python block")
    return block.group(1)


def blue_square_box() -> list[float]:
    """Pixel box (x1, y1, x2, y2) of the sample scene's blue square, read from the image itself."""
    rgb = np.asarray(Image.open(SAMPLE).convert("RGB")).astype(int)
    blue = (rgb[..., 2] > 180) & (rgb[..., 0] < 100) & (rgb[..., 1] < 140)
    ys, xs = np.nonzero(blue)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def mask_box(mask: np.ndarray) -> list[float]:
    """Tight pixel box (x1, y1, x2, y2) of a boolean `(H, W)` mask."""
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_quick_start_block_is_marked():
    code = quick_start_block()
    assert "PaDTPredictor" in code and "padt/assets/tiny_default" in code
    assert "qwen_vl_utils" not in code and "torchvision" not in code


def test_quick_start_runs_as_written(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__main__"}
    # the point of this test: run the README's own code, unchanged
    exec(compile(quick_start_block(), "README.md (Quick start)", "exec"), namespace)  # noqa: S102

    pred = namespace["pred"]
    printed = capsys.readouterr().out
    assert pred.text.strip() and pred.text in printed
    assert "<|VRT_" in pred.text and pred.text.startswith('The "the blue square" refers to')
    width, height = Image.open(SAMPLE).size
    assert pred.image_size == (width, height)
    assert len(pred.objects) == 1
    obj = pred.objects[0]
    assert obj.label == "the blue square"
    x1, y1, x2, y2 = obj.box_xyxy
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert iou(obj.box_xyxy, blue_square_box()) > 0.7
    assert 0.0 <= obj.score <= 1.0
    grid_cells = (height // 28) * (width // 28)
    assert len(obj.vrt_ids) == 5 and all(0 <= k < grid_cells for k in obj.vrt_ids)
    assert obj.mask.shape == (height, width) and obj.mask.dtype == bool
    assert iou(obj.box_xyxy, mask_box(obj.mask)) > 0.7
