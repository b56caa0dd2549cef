"""VRTCodec: id arithmetic, cells per image and their offsets, multi-image and image-less rows, errors, no mutation."""

from pathlib import Path

import pytest
import torch

from padt.processing.vrt import (
    VRTCodec,
    cell_offsets,
    cells_per_image,
    image_sample_idx_from_counts,
    local_to_global_cells,
    pid2vrt,
)

ORACLE = Path(__file__).parent / "fixtures" / "oracle_ref"
V = 512


@pytest.fixture
def codec():
    return VRTCodec(V, spatial_merge_size=2)


def test_token_strings():
    assert pid2vrt([3, 7]) == "<|VRT_3|><|VRT_7|>"
    assert pid2vrt(4) == "<|VRT_4|>"
    assert pid2vrt(torch.tensor([[1], [2]])) == "<|VRT_1|><|VRT_2|>"


def test_cells_and_offsets(codec):
    grid = torch.tensor([[1, 6, 8], [1, 8, 4], [2, 4, 4]])
    assert codec.num_cells(grid).tolist() == [12, 8, 8]
    assert cell_offsets(codec.cells_per_image(grid)) == [0, 12, 20]
    assert codec.cells_per_image([[1, 2, 2]]) == [1]
    assert VRTCodec(V, spatial_merge_size=1).num_cells(grid).tolist() == [48, 32, 32]
    assert codec.num_cells(None).tolist() == []
    with pytest.raises(ValueError, match="not divisible"):
        codec.num_cells(torch.tensor([[1, 5, 4]]))
    with pytest.raises(ValueError, match="shape"):
        codec.num_cells(torch.tensor([[1, 4]]))


def test_merged_grid(codec):
    grid = (1, 6, 8)  # merged 3 x 4
    assert codec.merged_grid(grid) == (1, 3, 4)
    with pytest.raises(ValueError, match="at least 28x28 px"):
        cells_per_image(torch.tensor([[1, 6, 8], [1, 16, 1]]), 2, cell_size_px=28)


def test_one_image_per_row_matches_authors_offsets(codec):
    grid = torch.tensor([[1, 6, 8], [1, 8, 4]])  # 12 and 8 cells
    local = torch.tensor([[1, V + 5, V + 11, 2], [V + 0, V + 7, 3, 4]])
    glob = codec.to_global(local, grid)
    assert glob.tolist() == [[1, V + 5, V + 11, 2], [V + 12, V + 19, 3, 4]]
    assert torch.equal(codec.to_local(glob, grid), local)


def test_inputs_not_mutated(codec):
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    local = torch.tensor([[V + 1, 5], [V + 3, 6]])
    before = local.clone()
    glob = codec.to_global(local, grid)
    assert torch.equal(local, before)
    assert glob.data_ptr() != local.data_ptr()
    glob_before = glob.clone()
    codec.to_local(glob, grid)
    assert torch.equal(glob, glob_before)


def test_multi_image_and_image_less_rows(codec):
    # images: 0 (4 cells) and 1 (12 cells) in row 0, none in row 1, image 2 (1 cell) in row 2
    grid = torch.tensor([[1, 4, 4], [1, 6, 8], [1, 2, 2]])
    sample_idx = [0, 0, 2]
    local = torch.tensor([
        [V + 0, V + 3, V + 4, V + 15],  # k < 4 -> image 0; 4 <= k < 16 -> image 1
        [7, 8, 9, 10],                  # no image, no VRT: fine
        [V + 0, 11, 12, 13],            # its only image starts at global cell 16
    ])  # fmt: skip
    glob = codec.to_global(local, grid, sample_idx)
    assert glob[0].tolist() == [V + 0, V + 3, V + 4, V + 15]
    assert glob[1].tolist() == [7, 8, 9, 10]
    assert glob[2].tolist() == [V + 16, 11, 12, 13]
    assert torch.equal(codec.to_local(glob, grid, sample_idx), local)
    # rows ordered differently from images: image 0 in row 1, image 1 in row 0
    grid2 = torch.tensor([[1, 4, 4], [1, 2, 2]])
    glob2 = codec.to_global(torch.tensor([[V + 0], [V + 3]]), grid2, torch.tensor([1, 0]))
    assert glob2.tolist() == [[V + 4], [V + 3]]
    assert codec.to_local(glob2, grid2, torch.tensor([1, 0])).tolist() == [[V + 0], [V + 3]]
    assert codec.row_cell_ranges(3, grid, sample_idx) == [[(0, 4), (4, 12)], [], [(16, 1)]]


def test_out_of_range_vrt_raises_naming_row_and_id(codec):
    grid = torch.tensor([[1, 4, 4], [1, 2, 2]])  # 4 and 1 cells
    with pytest.raises(ValueError, match=r"row 1: local VRT id 513 \(<\|VRT_1\|>\)"):
        codec.to_global(torch.tensor([[V + 3], [V + 1]]), grid)
    with pytest.raises(ValueError, match="row 0: global VRT id 516"):
        codec.to_local(torch.tensor([[V + 4], [V + 4]]), grid)  # cell 4 belongs to row 1's image
    with pytest.raises(ValueError, match=r"row 1: .*0 image"):
        codec.to_global(torch.tensor([[V + 0], [V + 0]]), grid[:1], [0])
    with pytest.raises(ValueError, match="pass image_sample_idx"):
        codec.to_global(torch.tensor([[V]]), grid)  # 2 images, 1 row, default mapping
    with pytest.raises(ValueError, match="not a row"):
        codec.to_global(torch.tensor([[V]]), grid, [0, 3])
    with pytest.raises(TypeError):
        codec.to_global(torch.tensor([[1.0]]), grid[:1])


def test_one_dim_input_and_no_vrt(codec):
    grid = torch.tensor([[1, 4, 4]])
    assert codec.to_global(torch.tensor([V + 2, 5]), grid).tolist() == [V + 2, 5]
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(codec.to_global(ids, None), ids)  # no VRT: grids not even needed


def test_local_to_global_cells_and_sample_idx():
    assert local_to_global_cells([(10, 4)], [0, 3]) == [10, 13]
    assert local_to_global_cells([(0, 4), (20, 2)], [3, 4, 5]) == [3, 20, 21]
    with pytest.raises(ValueError, match="outside"):
        local_to_global_cells([(0, 4), (20, 2)], [6])
    with pytest.raises(ValueError, match="outside"):
        local_to_global_cells([(0, 4)], [4])
    assert image_sample_idx_from_counts([1, 0, 2]).tolist() == [0, 2, 2]
    with pytest.raises(ValueError):
        image_sample_idx_from_counts([1, -1])


def test_oracle_completion_local_to_global():
    safetensors = pytest.importorskip("safetensors.torch")
    t = safetensors.load_file(str(ORACLE / "io.safetensors"))
    codec = VRTCodec(512, 2)
    local = t["inputs.completion_ids_local"]
    glob = codec.to_global(local, t["inputs.image_grid_thw"])
    assert torch.equal(glob, t["inputs.input_ids"][:, 64:])
    assert torch.equal(codec.to_local(glob, t["inputs.image_grid_thw"]), local)
