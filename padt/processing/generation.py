"""Generation helper: distinct VRTs within one object's run of VRT tokens.

PaDT is trained on 5 *different* foreground cells per object (docs/method.md#the-training-step-and-losses), and the
robust CE hides the object's other cells at every VRT target, so nothing teaches the LLM to avoid repeating a cell.
Greedy decoding therefore often emits the same `<|VRT_k|>` five times (68 % of the shipped shapes model's REC
answers), and the decoder then sees five copies of one cell feature, unlike in training. `DistinctVRTLogitsProcessor`
forbids the VRT ids already emitted in the current run of consecutive VRT tokens, so an object's VRTs are distinct
cells as in training. It is opt-in (`PaDTPredictor(distinct_vrts=True)`, `eval/evaluate.py --distinct-vrts`); the
authors decode without it.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

__all__ = ["DistinctVRTLogitsProcessor"]


class DistinctVRTLogitsProcessor(LogitsProcessor):
    """Sets to -inf the scores of the VRT ids in each row's trailing run of VRT tokens (ids >= `vrt_base_id`).

    Args:
        vrt_base_id (`int`): id of `<|VRT_0|>` (`config.vrt_base_id`); every id from it on is a VRT.
    """

    def __init__(self, vrt_base_id: int) -> None:
        if vrt_base_id < 1:
            raise ValueError(f"vrt_base_id must be a positive token id, got {vrt_base_id}")
        self.vrt_base_id = vrt_base_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids (B, L), scores (B, K) -> scores with the current run's VRT ids at -inf."""
        is_vrt = input_ids >= self.vrt_base_id
        # trailing run: positions from which every later token is a VRT
        in_run = is_vrt.flip(1).cumprod(1).flip(1).bool()
        if not bool(in_run.any()):
            return scores
        width = scores.shape[1]
        ids = torch.where(in_run & (input_ids < width), input_ids, width)  # `width` = a spare column, dropped below
        padded = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], 1)
        return padded.scatter(1, ids, float("-inf"))[:, :width]
