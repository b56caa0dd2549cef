"""padt.processing.generation: distinct VRTs within an object's run, unit and end to end on the shipped shapes model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from padt.processing.generation import DistinctVRTLogitsProcessor

SHIPPED = Path(__file__).resolve().parent.parent / "padt" / "assets" / "tiny_default"


def test_only_the_trailing_vrt_run_is_forbidden():
    V = 10
    proc = DistinctVRTLogitsProcessor(V)
    input_ids = torch.tensor([
        [1, 12, 13, 2, 14, 15],  # run = (14, 15); 12 and 13 belong to an earlier object
        [1, 2, 3, 12, 12, 16],  # run = (12, 12, 16)
        [11, 12, 13, 4, 5, 6],  # text last: no run
    ])
    scores = torch.zeros(3, 18)
    out = proc(input_ids, scores.clone())
    forbidden = [set((out[b] == float("-inf")).nonzero().flatten().tolist()) for b in range(3)]
    assert forbidden == [{14, 15}, {12, 16}, set()]
    assert out.shape == scores.shape and bool((out[2] == 0).all())


def test_vrt_ids_beyond_the_scores_are_ignored_and_bad_base_is_named():
    out = DistinctVRTLogitsProcessor(4)(torch.tensor([[1, 5, 9]]), torch.zeros(1, 8))
    assert (out[0] == float("-inf")).nonzero().flatten().tolist() == [5]  # 9 is outside the 8 scores
    with pytest.raises(ValueError, match="vrt_base_id"):
        DistinctVRTLogitsProcessor(0)


def test_shipped_model_answers_with_distinct_vrts_per_object():
    """Greedy decoding of the shipped shapes model repeats cells (68 % of its REC answers); with the processor every
    object's VRTs are distinct."""
    from padt.inference.predictor import PaDTPredictor
    from padt.preprocess.templates import rec_prompt

    predictor = PaDTPredictor.from_pretrained(SHIPPED, device="cpu", max_new_tokens=48)
    image = SHIPPED / "sample.png"
    prompts = [rec_prompt(e) for e in ("the red circle", "the blue square", "the white triangle", "the green square")]
    plain = predictor.predict([image] * len(prompts), prompts)
    predictor.distinct_vrts = True
    distinct = predictor.predict([image] * len(prompts), prompts)
    runs = [list(o.vrt_ids) for p in distinct for o in p.objects]
    assert runs and all(len(set(r)) == len(r) for r in runs)
    assert any(len(set(o.vrt_ids)) < len(o.vrt_ids) for p in plain for o in p.objects)  # the default repeats
