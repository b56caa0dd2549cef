"""padt.geometry.grids: Qwen's smart_resize (both rounding rules), the processor's and the released data's grids,
and `GridSpec` (preprocessing's `GridGeometry`)."""

import numpy as np
import pytest

from padt.geometry.grids import merged_grid_for_image, rounded_grid, smart_resize

CELL = 28  # patch 14 x merge 2, passed explicitly everywhere


def test_smart_resize_rules():
    assert smart_resize(60, 100, 28, 4 * 28 * 28, 256 * 28 * 28) == (56, 112)
    h, w = smart_resize(1000, 2000, 28, 4 * 28 * 28, 64 * 28 * 28)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 64 * 28 * 28 and abs(w / h - 2) < 0.3
    h, w = smart_resize(10, 10, 28, 16 * 28 * 28, 64 * 28 * 28)
    assert (h, w) == (112, 112)
    assert smart_resize(5, 5, 28, 0, 10**9) == (28, 28)  # never below one cell
    assert smart_resize(448, 448, 32) == (448, 448)  # the factor is an argument, not 28
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000, 28)
    with pytest.raises(ValueError, match="max_pixels"):
        smart_resize(100, 100, 28, 1000, 10)


def test_merged_grid_matches_transformers_smart_resize():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    rng = np.random.default_rng(0)
    sizes = [(56, 84), (20, 20), (182, 100), (5, 300), (4000, 3000), (1288, 966)]
    sizes += [tuple(int(v) for v in rng.integers(8, 3000, size=2)) for _ in range(200)]
    for min_px, max_px, patch, merge in [(3136, 12845056, 14, 2), (4 * 784, 64 * 784, 14, 2), (1024, 200000, 16, 2)]:
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            rh, rw = smart_resize(h, w, factor=patch * merge, min_pixels=min_px, max_pixels=max_px)
            grid = merged_grid_for_image(h, w, patch_size=patch, merge_size=merge, min_pixels=min_px,
                                         max_pixels=max_px)
            assert grid == (rh // (patch * merge), rw // (patch * merge)), (h, w, min_px, max_px)
    assert merged_grid_for_image(20, 20, patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056) == (2, 2)
    with pytest.raises(ValueError, match="aspect ratio"):
        merged_grid_for_image(10, 3000, patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056)


def test_rounded_grid_is_half_to_even():
    assert rounded_grid(182, 98, cell_size=CELL) == (6, 4)  # 6.5 -> 6, 3.5 -> 4
    assert rounded_grid(56, 84, cell_size=CELL) == (2, 3)


def test_smart_resize_rounding_rules_differ_only_for_thin_images():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as transformers_resize

    assert smart_resize(10, 1000, 28, 3136, 10**7) == (28, 1008)  # qwen_vl_utils: a side rounds to >= one cell
    ours = smart_resize(10, 1000, 28, 3136, 10**7, at_least_one_cell=False)
    assert ours == transformers_resize(10, 1000, factor=28, min_pixels=3136, max_pixels=10**7) != (28, 1008)
    assert smart_resize(300, 500, 28, 3136, 10**7, at_least_one_cell=False) == smart_resize(300, 500, 28, 3136, 10**7)


def test_one_grid_class_for_training_data_and_preprocessing():
    from padt.geometry.grids import GridGeometry, GridTooSmallError
    from padt.preprocess.common import GridSpec, Skip

    processor = GridGeometry(14, 2, min_pixels=4 * 784, max_pixels=64 * 784)
    assert processor.cell_size == 28 and processor.grid(1000, 2000) == merged_grid_for_image(
        1000, 2000, patch_size=14, merge_size=2, min_pixels=4 * 784, max_pixels=64 * 784)
    spec = GridSpec(14, 2, min_pixels=4 * 784, max_pixels=64 * 784, mode="processor")
    assert isinstance(spec, GridGeometry) and spec.grid(1000, 2000) == processor.grid(1000, 2000)
    released = GridSpec(14, 2)  # preprocessing's default: the released data's rounded grid
    assert released.mode == "round" and released.grid(182, 98) == rounded_grid(182, 98, cell_size=CELL)
    with pytest.raises(Skip, match="too small"):
        released.grid(10, 500)
    with pytest.raises(GridTooSmallError, match="too small"):
        GridGeometry(14, 2, mode="round").grid(10, 500)
    with pytest.raises(ValueError, match="min_pixels"):
        GridGeometry(14, 2)  # the processor's grid needs its pixel limits
    with pytest.raises(ValueError, match="mode"):
        GridSpec(14, 2, mode="nearest")
    with pytest.raises(ValueError, match="max_pixels"):
        GridGeometry(14, 2, min_pixels=100, max_pixels=10)
