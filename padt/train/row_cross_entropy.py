"""Per-row cross-entropy in fp32 with a hand-written backward, for the wide text + VRT logits of a training step (the
kernel under `padt.train.losses.robust_vrt_cross_entropy`).

Why not `torch.logsumexp` / `F.cross_entropy`: PaDT's logits rows are wide (vocabulary + every VRT cell of the batch)
and mix text logits near 0 with VRT logits of tens or hundreds, so `exp(x - max)` of most text logits falls into the
fp32 *denormal* range (below e^-87), where x86 arithmetic takes a slow path. On the training benchmark the two softmax
passes of autograd (forward `exp`, backward `exp_`) took 24 ms on 1.6 M values, 6x their normal speed, and the
boolean-mask gather of completion rows (`logits[keep]`) added a 10 ms serial scatter in its backward. Here:

* terms below e^-87 of the row maximum are set to exactly 0 (`F.threshold_`): each is < 1.2e-38 against a sum >= 1,
  far below fp32 resolution, so the loss is unchanged and its gradient differs by less than 1e-38 per entry;
* every row of the `(B, C, K)` logits is processed (no gather); callers weight or drop rows afterwards;
* one fp32 working copy of the logits serves forward and backward (the backward overwrites it with the gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["DENORMAL_EXPONENT", "row_cross_entropy"]

# exp(x) for x < -87.3 is an fp32 denormal; such terms are set to 0 (see the module docstring)
DENORMAL_EXPONENT = -87.0


class _RowCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, hide_index: torch.Tensor | None,
                hide: torch.Tensor | None) -> torch.Tensor:
        rows, width = targets.numel(), logits.shape[-1]
        work = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        work.copy_(logits)  # fp32 copy, also gathers a strided (B, C, K) slice into one block
        work = work.view(rows, width)
        if hide is not None:
            cells = work[hide_index, width - hide.shape[1]:]
            work[hide_index, width - hide.shape[1]:] = cells.masked_fill(hide, float("-inf"))
        top = work.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows of -inf only (padding)
        work.sub_(top)
        target_logit = work.gather(1, targets[:, None]).squeeze(1)  # before the threshold: may lie below it
        F.threshold_(work, DENORMAL_EXPONENT, float("-inf"))
        work.exp_()
        total = work.sum(-1)
        ctx.save_for_backward(work, total, targets)
        ctx.input_shape, ctx.input_dtype, ctx.backward_done = logits.shape, logits.dtype, False
        return total.log() - target_logit

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.backward_done:
            raise RuntimeError("row_cross_entropy's backward reuses its forward buffer and can run only once per graph")
        ctx.backward_done = True
        work, total, targets = ctx.saved_tensors
        scale = torch.where(total > 0, grad / total, torch.zeros_like(grad))
        work.mul_(scale[:, None])  # softmax * grad, in place: the buffer is not used again
        work.scatter_add_(1, targets[:, None], -grad[:, None])
        return work.view(ctx.input_shape).to(ctx.input_dtype), None, None, None


def row_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    hide_index: torch.Tensor | None = None,
    hide: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of `targets` under the softmax of every row of `logits`, in fp32.

    Args:
        logits (`torch.Tensor` of shape `(*rows, K)`, any float dtype, may be a strided view): one row per token.
        targets (`torch.LongTensor` of shape `rows`): a class in `[0, K)` for every row (give any valid class on rows
            you will drop).
        hide_index (`torch.LongTensor` of shape `(R,)`, *optional*): flat row numbers whose last `N` columns are
            partly removed from the softmax (set to -inf) by `hide`.
        hide (`torch.BoolTensor` of shape `(R, N)`, *optional*): True at the removed columns `K - N + j`; must not
            hide a row's target.

    Returns:
        `torch.Tensor` of shape `(prod(rows),)`, float32: `logsumexp(row) - row[target]` (NaN or inf on rows whose
        logits are all -inf; mask those out with `torch.where`, which keeps their gradient 0).
    """
    if (hide is None) != (hide_index is None):
        raise ValueError("give hide_index and hide together")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} need targets of shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    flat_targets = targets.reshape(-1)
    if hide is not None:
        hide = hide.to(device=logits.device, dtype=torch.bool)
        if hide.dim() != 2 or hide_index.shape != (hide.shape[0],) or hide.shape[1] > logits.shape[-1]:
            raise ValueError(f"hide {tuple(hide.shape)} needs hide_index of shape ({hide.shape[0]},) and at most "
                             f"{logits.shape[-1]} columns; got hide_index {tuple(hide_index.shape)}")
    return _RowCrossEntropy.apply(logits, flat_targets, hide_index, hide)
