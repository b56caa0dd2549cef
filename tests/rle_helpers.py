"""Test helper shared by the mask and preprocessing tests: a crowd-style (uncompressed) COCO RLE built by hand."""

from __future__ import annotations

import numpy as np


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Crowd-style RLE of an `(H, W)` 0/1 mask: run lengths over the column-major flattened mask, starting with
    zeros; ``{"size": [H, W], "counts": [int, ...]}``."""
    flat, runs, cur, n = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return {"size": list(mask.shape), "counts": runs}
