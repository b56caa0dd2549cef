"""Training data: JSONL records (local or dataset hub, mixed), VRT sampling, the dataset and the batch collator.

See `padt.data.collator` for the batch format shared with `padt.train.step.compute_padt_loss`.
"""

from padt.data.cells import box_centre_cell, derive_cells, gt_mask_at_patch_grid, upscale_tiny_image
from padt.data.collator import PaDTCollator, robust_cell_mask
from padt.data.dataset import PaDTDataset
from padt.data.records import (
    DataSource,
    HubRecords,
    JsonlRecords,
    load_sources,
    load_sources_yaml,
    open_records,
    parse_sources,
    split_hub_path,
    validate_record,
)
from padt.data.sampling import (
    build_answer,
    check_num_vrt,
    pick_cells,
    placeholder_ids,
    placeholder_mentions,
    sample_object_vrts,
    sample_rng,
)
from padt.geometry.grids import GridGeometry

__all__ = [
    "DataSource",
    "GridGeometry",
    "HubRecords",
    "JsonlRecords",
    "PaDTCollator",
    "PaDTDataset",
    "box_centre_cell",
    "build_answer",
    "check_num_vrt",
    "derive_cells",
    "gt_mask_at_patch_grid",
    "load_sources",
    "load_sources_yaml",
    "open_records",
    "parse_sources",
    "pick_cells",
    "placeholder_ids",
    "placeholder_mentions",
    "robust_cell_mask",
    "sample_object_vrts",
    "sample_rng",
    "split_hub_path",
    "upscale_tiny_image",
    "validate_record",
]
