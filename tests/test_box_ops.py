"""Box ops by value (the pure-torch path; torchvision is not installed in CI) and against each other."""

from __future__ import annotations

import pytest
import torch

from padt.geometry import boxes as box_ops
from padt.geometry.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)


def test_format_round_trip_and_values():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.8, 0.2, 1.0]]))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh)
    assert box_cxcywh_to_xyxy(torch.rand(2, 3, 4)).shape == (2, 3, 4)  # any leading shape


def test_area_iou_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 4.0, 5.0, 5.0]])
    assert torch.equal(box_area(b), torch.tensor([4.0, 4.0, 1.0]))
    iou, union = box_iou(a, b)
    # overlap 1, union 7 | identical | disjoint
    assert torch.allclose(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 4.0, 5.0]]))
    giou = generalized_box_iou(a, b)
    # enclosing areas 9, 4, 25: giou = iou - (C - U) / C
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, 1.0, 0.0 - 20 / 25]]))


def test_elementwise_equals_diagonal_of_pairwise():
    g = torch.Generator().manual_seed(0)
    p = box_cxcywh_to_xyxy(torch.rand(6, 4, generator=g) * 0.5 + 0.2)
    q = box_cxcywh_to_xyxy(torch.rand(6, 4, generator=g) * 0.5 + 0.2)
    iou, union = elementwise_box_iou(p, q)
    assert torch.allclose(iou, box_iou(p, q)[0].diagonal())
    assert torch.allclose(union, box_iou(p, q)[1].diagonal())
    giou, iou2 = elementwise_generalized_box_iou(p, q)
    assert torch.allclose(giou, generalized_box_iou(p, q).diagonal())
    assert torch.equal(iou2, iou)
    assert bool((giou <= iou).all()) and bool((giou >= -1).all())


def test_half_precision_areas_are_upcast():
    boxes = torch.tensor([[0.0, 0.0, 0.3, 0.7]], dtype=torch.bfloat16)
    area = box_area(boxes)
    assert area.dtype == torch.float32  # torchvision's behaviour, which the authors' bf16 gt boxes went through
    assert torch.equal(area, (boxes[:, 2].float() - boxes[:, 0].float()) * (boxes[:, 3].float() - boxes[:, 1].float()))


def test_pure_torch_path_matches_torchvision_when_available():
    tv = pytest.importorskip("torchvision.ops")
    g = torch.Generator().manual_seed(1)
    p = box_cxcywh_to_xyxy(torch.rand(5, 4, generator=g) * 0.5 + 0.2)
    q = box_cxcywh_to_xyxy(torch.rand(7, 4, generator=g) * 0.5 + 0.2)
    assert torch.allclose(box_ops._generalized_box_iou_torch(p, q), tv.generalized_box_iou(p, q))
    assert torch.allclose(box_iou(p, q)[0], tv.box_iou(p, q))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="degenerate"):
        generalized_box_iou(torch.tensor([[0.5, 0.5, 0.1, 0.9]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        box_cxcywh_to_xyxy(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="same shape"):
        elementwise_box_iou(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(TypeError):
        box_area([[0, 0, 1, 1]])


def test_empty_inputs():
    e = torch.zeros(0, 4)
    giou, iou = elementwise_generalized_box_iou(e, e)
    assert giou.shape == (0,) and iou.shape == (0,)
    assert generalized_box_iou(e, torch.tensor([[0.0, 0.0, 1.0, 1.0]])).shape == (0, 1)
