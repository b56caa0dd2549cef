"""fp32 kernels of the decoder: the same math as :mod:`padt.model.decoder.layers`, in fewer and cheaper passes.

The reference code (``layers.py``, ``attention.py``) is what the authors' recipe runs: bf16 weights under DeepSpeed
ZeRO-3 on GPUs, where nothing in this module is used. CPU training and inference run in fp32, where autograd's
generic graphs of small ops dominate the cost; the kernels here give the same values (to fp32 rounding; tested
against the reference in tests/test_decoder_layers.py) with hand-written backwards and fewer temporaries:

* ``rms_norm`` / ``rms_normalize`` / ``_RMSNormPairFP32``: RMSNorm with a four-pass backward; the pair shares one
  normalisation between two norms of the same input (``norm3`` and ``norm6`` of a block's memory).
* ``rotary``: rotate-half rotary without the ``cat``/``neg`` temporaries; ``_rotate_pairs``: the same rotation on
  pair-interleaved channels as one complex product.
* ``two_way_block``: :class:`~padt.model.decoder.layers.TwoWayBlock` whose two cross-attentions, when one side is
  short (a few task + VRT tokens against an image memory), are computed in a cheaper but mathematically identical
  order that reads the weights of several submodules at once (``attend_few_queries``, ``attend_few_keys``).

Every layer asks :func:`use_fused` once whether its inputs allow these kernels.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from padt.model.decoder.attention import RotaryPE, VarlenAttention, VarlenLayout
    from padt.model.decoder.layers import TwoWayBlock

__all__ = ["rms_norm", "rms_normalize", "rotary", "two_way_block", "use_fused"]


def use_fused(x: torch.Tensor, *weights: torch.Tensor, gathered: bool = False) -> bool:
    """Whether a layer may compute its input `x` with this module's fp32 kernels instead of its reference code.

    Args:
        x (`torch.Tensor`): the layer's input; the kernels are written for fp32.
        weights (`torch.Tensor`): the parameters the kernel reads; all must be fp32.
        gathered (`bool`): the weights belong to the calling module. DeepSpeed ZeRO-3 gathers a module's parameters
            only while that module runs, so a kernel that reads other modules' weights must not run on ZeRO-3
            parameters (those with a ``ds_id``); a module's own weights are gathered during its forward.
    """
    if x.dtype != torch.float32:
        return False
    for w in weights:
        if w.dtype != torch.float32 or (not gathered and hasattr(w, "ds_id")):
            return False
    return True


# ---------------------------------------------------------------------------------------------------- RMS norm
def _normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x * rstd, rstd)``, ``rstd = rsqrt(mean(x^2) + eps)`` of shape (..., 1): the forward of every fp32 norm."""
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd, rstd


class _RMSNormFP32(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps))`` for fp32 ``x`` with a hand-written backward.

    The forward is the reference `RMSNorm`'s arithmetic; the backward saves only ``x_hat`` and the (..., 1) inverse
    rms and makes four passes over ``(..., D)`` instead of the ten or so of autograd's pow/mean/rsqrt/mul chain.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x_hat, rstd = _normalize(x, eps)
        ctx.save_for_backward(x_hat, rstd, weight)
        return weight * x_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x_hat, rstd, weight = ctx.saved_tensors
        d = x_hat.shape[-1]
        p = grad * x_hat  # dL/dweight per row
        grad_w = p.reshape(-1, d).sum(0) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dL/dx = rstd * (g - x_hat * mean(g * x_hat)) with g = grad * weight; mean(g * x_hat) = (p @ weight) / D
            dot = torch.matmul(p, weight).unsqueeze(-1).div_(d)  # (..., 1)
            grad_x = torch.mul(grad, weight).mul_(rstd).addcmul_(x_hat, dot.mul_(rstd), value=-1)
        return grad_x, grad_w, None


class _RMSNormalizeFP32(torch.autograd.Function):
    """``x * rsqrt(mean(x^2) + eps)`` (no weight) for fp32 ``x``; backward ``rstd * (g - x_hat * mean(g * x_hat))``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        x_hat, rstd = _normalize(x, eps)
        ctx.save_for_backward(x_hat, rstd)
        return x_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x_hat, rstd = ctx.saved_tensors
        dot = (grad * x_hat).mean(-1, keepdim=True)  # (..., 1)
        return torch.addcmul(grad, x_hat, dot, value=-1).mul_(rstd), None


class _RMSNormPairFP32(torch.autograd.Function):
    """Two RMSNorms (weights `weight_a`, `weight_b`, same eps) of one fp32 ``x``: the normalisation is shared."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, eps: float):
        x_hat, rstd = _normalize(x, eps)
        ctx.save_for_backward(x_hat, rstd, weight_a, weight_b)
        return weight_a * x_hat, weight_b * x_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a, grad_b):
        x_hat, rstd, weight_a, weight_b = ctx.saved_tensors
        d = x_hat.shape[-1]
        p_a, p_b = grad_a * x_hat, grad_b * x_hat
        grad_wa = p_a.reshape(-1, d).sum(0) if ctx.needs_input_grad[1] else None
        grad_wb = p_b.reshape(-1, d).sum(0) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            # g = grad_a * w_a + grad_b * w_b; dL/dx = rstd * (g - x_hat * mean(g * x_hat))
            dot = (torch.matmul(p_a, weight_a) + torch.matmul(p_b, weight_b)).unsqueeze(-1).div_(d)
            grad_x = torch.mul(grad_a, weight_a).addcmul_(grad_b, weight_b).mul_(rstd)
            grad_x.addcmul_(x_hat, dot.mul_(rstd), value=-1)
        return grad_x, grad_wa, grad_wb, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm.forward` for fp32 `x` (..., D) and `weight` (D,)."""
    return _RMSNormFP32.apply(x, weight, eps)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)`` without a weight, for fp32 `x` (..., D)."""
    return _RMSNormalizeFP32.apply(x, eps)


# ---------------------------------------------------------------------------------------------------- rotary
class _Rotary(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` for fp32 ``x`` with a hand-written backward.

    Same arithmetic as the plain expression (each half is ``x_a * c_a -/+ x_b * s_a``), but without the ``cat``/``neg``
    temporaries and without saving ``x``: the backward is ``g * cos + rotate_half^T(g * sin)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        out = torch.mul(x, cos)
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)  # x1*c1 + (-x2)*s1
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])  # x2*c2 + x1*s2
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        h = grad.shape[-1] // 2
        gx = torch.mul(grad, cos)
        gx[..., :h].addcmul_(grad[..., h:], sin[..., h:])  # d/dx1 of x1*s2 in the second half
        gx[..., h:].addcmul_(grad[..., :h], sin[..., :h], value=-1)  # d/dx2 of -x2*s1 in the first half
        return gx, None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` for fp32 `x` (T, heads, head_dim) and fp32 tables (T, 1, head_dim) that need no gradient."""
    return _Rotary.apply(x, cos, sin)


@functools.lru_cache(maxsize=8)
def _pair_interleaved_order(num_heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Output-channel order (0, d/2, 1, d/2 + 1, ...) within every head, as a `(heads * head_dim,)` index."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], -1).reshape(-1)  # head_dim
    return (torch.arange(num_heads)[:, None] * head_dim + within).reshape(-1).to(device)


def _rotate_pairs(x: torch.Tensor, rope: RotaryPE) -> torch.Tensor:
    """Rotary embedding of pair-interleaved channels: pair c of `x` (..., T, heads, head_dim) times e^{i theta_c}.

    `rope` holds the ViT's duplicated (cos, sin) tables `(T, head_dim)` (cos[c] == cos[c + d/2]); in the channel order
    of `_pair_interleaved_order` this equals `apply_rotary`'s rotate-half rotation.
    """
    cos, sin = rope
    half = x.shape[-1] // 2
    phase = torch.complex(cos[:, :half].float(), sin[:, :half].float())[:, None, :]  # T x 1 x half, shared by heads
    return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], half, 2)) * phase).view(x.shape)


# ---------------------------------------------------------------------------------------------------- attention
def _project(attn: VarlenAttention, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """`linear(x)` (T, D) as (T, heads, head_dim) in the *pair-interleaved* channel order of each head.

    The lopsided attentions only use q and k in dot products, which do not change when both sides' channels are
    permuted alike; in the order (0, d/2, 1, d/2 + 1, ...) the rotate-half rotary of channels c and c + d/2 is the
    complex product of adjacent pairs with e^{i theta_c} (`_rotate_pairs`): one vectorised pass instead of
    `apply_rotary`'s strided half-head updates (about 2x faster here, forward and backward). The permutation is
    applied to the weight rows.
    """
    order = _pair_interleaved_order(attn.num_heads, attn.head_dim, x.device)
    return attn.separate_heads(F.linear(x, linear.weight.index_select(0, order), linear.bias.index_select(0, order)))


def attend_few_keys(
    attn: VarlenAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """`attn` over uniform segments with Lk * heads <= D < Lq (the image->query attention of the memory stream).

    q (Tq, h, d) and k (Tk, h, d) come from `_project` (rows may be strided), v (Tk, h, d). Returns (Tq, D).
    ``proj(softmax(q k^T) v)`` computed as ``softmax(q @ K_blk) @ V_proj + b``: ``K_blk`` (B, D, h*Lk) is the
    block-diagonal (per head) key matrix, so all heads' scores come from one product of the packed queries, and
    ``V_proj`` (B, h*Lk, D) pushes every head's values through its slice of the output projection first. This
    avoids the (Tq, D) x (D, D) output projection and the per-head layout copies.
    """
    h, d, b = attn.num_heads, attn.head_dim, num_segments
    lq, lk = q.shape[0] // b, k.shape[0] // b
    eye = torch.eye(h, dtype=q.dtype, device=q.device)
    k_blk = torch.einsum("bkhd,hg->bhdgk", k.reshape(b, lk, h, d) * (d**-0.5), eye).reshape(b, h * d, h * lk)
    # scores transposed, B x (h Lk) x Lq: the softmax then runs over a strided dim of size Lk with Lq contiguous,
    # which is far faster on CPU than a softmax over a tiny last dim
    scores_t = torch.bmm(q.reshape(b, lq, h * d), k_blk).transpose(1, 2).contiguous()
    probs_t = torch.softmax(scores_t.view(b, h, lk, lq), dim=2).view(b, h * lk, lq)
    w = attn.proj.weight.view(-1, h, d)  # D_out x h x d
    v_proj = torch.einsum("bkhd,ohd->bhko", v.reshape(b, lk, h, d), w).reshape(b, h * lk, -1)  # B x (h Lk) x D
    out = torch.baddbmm(attn.proj.bias, probs_t.transpose(1, 2), v_proj)  # B x Lq x D
    return out.reshape(b * lq, -1)


def attend_few_queries(
    attn: VarlenAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v_in: torch.Tensor,
    num_segments: int,
    v_in_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`attn` over uniform segments with Lq * heads <= D < Lk (the query->image attention over the memory stream).

    q (Tq, h, d) and k (Tk, h, d) come from `_project` (rows may be strided); v_in (Tk, D) is the *unprojected*
    value input, optionally still to be multiplied by `v_in_scale` (D,) per channel. Returns (Tq, D).
    ``softmax(q k^T) (v_in W_v^T + b_v)`` computed as ``(softmax(q k^T) v_in) W_v^T + b_v`` (softmax rows sum
    to 1): the long key side is mixed first (B, h*Lq, D) and the value projection runs on h*Lq rows per object
    instead of Lk. Scores of all heads come from one product with a block-diagonal (per head) query matrix.
    """
    h, d, b = attn.num_heads, attn.head_dim, num_segments
    lq, lk = q.shape[0] // b, k.shape[0] // b
    eye = torch.eye(h, dtype=q.dtype, device=q.device)
    q_blk = torch.einsum("blhd,hg->bhlgd", q.reshape(b, lq, h, d) * (d**-0.5), eye).reshape(b, h * lq, h * d)
    # scores transposed, B x Lk x (h Lq), so that the gradient of k comes out in k's own layout
    scores_t = torch.bmm(k.reshape(b, lk, h * d), q_blk.transpose(1, 2))
    probs_t = torch.softmax(scores_t, dim=1)
    mixed = torch.bmm(probs_t.transpose(1, 2), v_in.reshape(b, lk, -1)).view(b, h, lq, -1)  # B x h x Lq x D_in
    weight = attn.v_proj.weight if v_in_scale is None else attn.v_proj.weight * v_in_scale
    out = torch.einsum("bhlc,hdc->blhd", mixed, weight.view(h, d, -1)).reshape(b * lq, h * d) + attn.v_proj.bias
    return attn.proj(out)


# ---------------------------------------------------------------------------------------------------- two-way block
def _is_lopsided(
    block: TwoWayBlock, x: torch.Tensor, layout_q: VarlenLayout, layout_m: VarlenLayout, impl: str
) -> bool:
    """True when `attend_few_queries` / `attend_few_keys` compute the block's cross-attentions: the sdpa/eager backend,
    equal segment lengths on both sides, one side short (heads * length <= width of `x`) and the other longer, and
    cross-attention weights that `use_fused` accepts (these paths read them outside their modules)."""
    lq, lm = layout_q.max_len, layout_m.max_len
    q2i, i2q = block.cross_attn_query_to_image, block.cross_attn_image_to_query
    span = q2i.num_heads * min(lq, lm)
    return (
        impl in ("sdpa", "eager")
        and layout_q.is_uniform
        and layout_m.is_uniform
        and span <= x.shape[-1]
        and max(lq, lm) > span
        and use_fused(
            x, *(m.weight for attn in (q2i, i2q) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.proj))
        )
    )


def _memory_keys_and_queries(
    block: TwoWayBlock, memory: torch.Tensor, memory_pe: RotaryPE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory side of both cross-attentions from one normalisation and one matmul.

    ``k_proj(norm3(m))`` and ``q_proj(norm6(m))`` equal ``x_hat @ [W_k diag(w3) | W_q diag(w6)]^T + b`` with the
    unweighted ``x_hat = m / rms(m)``: the norm weights are folded into the projection rows, which are also put in
    the pair-interleaved order of `_project` and rotated together.

    Returns:
        x_hat (Tm, D), keys of query->image (Tm, h, d) and queries of image->query (Tm, h, d), both rotated.
    """
    q2i, i2q = block.cross_attn_query_to_image, block.cross_attn_image_to_query
    heads, head_dim, rows = q2i.num_heads, q2i.head_dim, memory.shape[0]
    order = _pair_interleaved_order(heads, head_dim, memory.device)
    weight = torch.stack([q2i.k_proj.weight * block.norm3.weight, i2q.q_proj.weight * block.norm6.weight])
    weight = weight.index_select(1, order)  # 2 x D_out x D_in, rows pair-interleaved
    bias = torch.stack([q2i.k_proj.bias, i2q.q_proj.bias]).index_select(1, order)  # 2 x D_out
    x_hat = rms_normalize(memory, block.norm3.eps)
    # 2 x Tm x D: one batched product whose two halves (keys, queries) each come out contiguous, as the
    # attention products that read them want (a (Tm, 2D) layout makes those products markedly slower on CPU)
    keys_queries = torch.baddbmm(bias[:, None, :], x_hat.expand(2, *x_hat.shape), weight.transpose(1, 2))
    keys_queries = _rotate_pairs(keys_queries.view(2, rows, heads, head_dim), memory_pe)
    keys, queries = keys_queries.unbind(0)
    return x_hat, keys, queries


def two_way_block(
    block: TwoWayBlock,
    queries: torch.Tensor,
    query_pe: torch.Tensor,
    memory: torch.Tensor,
    memory_pe: RotaryPE,
    layout_q: VarlenLayout,
    layout_m: VarlenLayout,
    implementation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`TwoWayBlock.forward` for fp32 (same stages, same results to fp32 rounding).

    The memory is unchanged until the block's end, so its two normalisations (norm3 for query->image, norm6 for
    image->query; one eps, as the block builds them) share one pass. When the cross-attentions are lopsided
    (`_is_lopsided`), the memory's keys and queries also come from one product and the attentions run in the cheaper
    orders of `attend_few_queries` / `attend_few_keys`; otherwise they are the reference attention modules.
    """
    q2i, i2q, impl = block.cross_attn_query_to_image, block.cross_attn_image_to_query, implementation
    # (1) self-attention
    x = block.norm1(queries)
    queries = queries + block.self_attn(x + query_pe, x + query_pe, x, layout_q, layout_q, implementation=impl)
    # (2) cross-attention, tokens -> image
    x = block.norm2(queries)
    lopsided = _is_lopsided(block, queries, layout_q, layout_m, impl)
    if lopsided:
        mem, k_mem, q_mem = _memory_keys_and_queries(block, memory, memory_pe)
        q = _project(q2i, x + query_pe, q2i.q_proj)
        queries = queries + attend_few_queries(q2i, q, k_mem, mem, layout_q.num_segments, block.norm3.weight)
    else:
        mem, mem_i2q = _RMSNormPairFP32.apply(memory, block.norm3.weight, block.norm6.weight, block.norm3.eps)
        queries = queries + q2i(x + query_pe, mem, mem, layout_q, layout_m, k_rope=memory_pe, implementation=impl)
    # (3) MLP
    queries = queries + block.mlp(block.norm4(queries))
    # (4) cross-attention, image -> tokens
    x = block.norm5(queries)
    if lopsided:
        k = _project(i2q, x + query_pe, i2q.k_proj)
        update = attend_few_keys(i2q, q_mem, k, i2q.separate_heads(i2q.v_proj(x)), layout_q.num_segments)
    else:
        update = i2q(mem_i2q, x + query_pe, x, layout_m, layout_q, q_rope=memory_pe, implementation=impl)
    return queries, memory + update
