"""padt.train.row_cross_entropy: values and gradients against torch's cross-entropy, hidden columns, the denormal cut."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from padt.train.row_cross_entropy import DENORMAL_EXPONENT, row_cross_entropy


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1), reduction="none")


def test_values_and_gradient_match_torch_cross_entropy_with_wide_logit_spread():
    """Text logits near 0 next to VRT logits of ~150: most exp terms fall below e^-87 and are cut, yet loss and
    gradient agree with float64 cross-entropy."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 40, generator=g)
    logits[..., 30:] += 150 * torch.rand(3, 5, 10, generator=g)
    targets = torch.randint(0, 40, (3, 5), generator=g)
    weights = torch.rand(3, 5, generator=g)
    x = logits.clone().requires_grad_(True)
    got = row_cross_entropy(x, targets)
    (got * weights.reshape(-1)).sum().backward()
    ref_x = logits.double().requires_grad_(True)
    ref = _reference(ref_x, targets)
    (ref * weights.reshape(-1).double()).sum().backward()
    assert got.dtype == torch.float32 and got.shape == (15,)
    assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-4)
    assert torch.allclose(x.grad.double(), ref_x.grad, atol=1e-6)
    shifted = logits - logits.amax(-1, keepdim=True)
    assert bool((shifted < DENORMAL_EXPONENT).any())  # the cut was exercised
    cut = (shifted < DENORMAL_EXPONENT) & (torch.arange(40) != targets[..., None])  # targets get -weight
    assert bool((x.grad[cut] == 0).all())  # exact zeros there, no denormals


def test_target_far_below_the_maximum_keeps_its_true_nll():
    logits = torch.tensor([[0.0, 200.0, 1.0]], requires_grad=True)
    nll = row_cross_entropy(logits, torch.tensor([0]))
    assert abs(nll.item() - 200.0) < 1e-3  # not inf, although exp(-200) is cut
    nll.sum().backward()
    assert torch.allclose(logits.grad, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-6)


def test_hidden_columns_leave_the_softmax_and_get_no_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 9, generator=g)
    targets = torch.tensor([[0, 6, 1], [7, 2, 8]])
    hide_index = torch.tensor([1, 3])  # rows (0, 1) and (1, 0); hide covers the last 4 columns (5..8)
    hide = torch.tensor([[True, False, True, False], [True, False, False, True]])  # targets 6, 7 stay
    x = logits.clone().requires_grad_(True)
    got = row_cross_entropy(x, targets, hide_index, hide)
    got.sum().backward()
    masked = logits.reshape(6, 9).clone()
    masked[1, 5:][hide[0]] = float("-inf")
    masked[3, 5:][hide[1]] = float("-inf")
    ref_x = masked.double().requires_grad_(True)
    ref = F.cross_entropy(ref_x, targets.reshape(-1), reduction="none")
    ref.sum().backward()
    assert torch.allclose(got.double(), ref, atol=1e-6)
    assert torch.allclose(x.grad.reshape(6, 9).double(), torch.nan_to_num(ref_x.grad), atol=1e-6)
    assert x.grad.reshape(6, 9)[1, 7] == 0 and x.grad.reshape(6, 9)[3, 8] == 0


def test_strided_bf16_input_gets_a_bf16_gradient_of_its_own_shape():
    g = torch.Generator().manual_seed(2)
    full = (torch.randn(2, 5, 12, generator=g) * 4).bfloat16().requires_grad_(True)
    view = full[:, :-1]  # what the training step passes: logits[:, :-1]
    targets = torch.randint(0, 12, (2, 4), generator=g)
    got = row_cross_entropy(view, targets)
    got.sum().backward()
    assert torch.allclose(got.double(), _reference(view.detach().float(), targets), atol=1e-5)
    assert full.grad.dtype == torch.bfloat16 and full.grad.shape == full.shape
    assert bool((full.grad[:, -1] == 0).all()) and bool((full.grad[:, :-1] != 0).any())


def test_rows_of_minus_inf_only_are_maskable_without_nan_gradients():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = float("-inf")
    x = logits.clone().requires_grad_(True)
    keep = torch.tensor([True, False])
    nll = torch.where(keep, row_cross_entropy(x, torch.tensor([[1, 0]])), 0.0)
    nll.sum().backward()
    assert torch.isfinite(x.grad).all() and bool((x.grad[0, 1] == 0).all())


def test_second_backward_is_refused_and_bad_arguments_are_named():
    x = torch.randn(2, 3, requires_grad=True)
    nll = row_cross_entropy(x, torch.tensor([0, 1])).sum()
    nll.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        nll.backward()
    with pytest.raises(ValueError, match="together"):
        row_cross_entropy(x, torch.tensor([0, 1]), hide=torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="targets of shape"):
        row_cross_entropy(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="hide_index of shape"):
        row_cross_entropy(x, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.zeros(1, 2, dtype=torch.bool))
