"""The PaDT box / score / mask decoder (spec sections 4.2 and 5).

A SAM-style two-way transformer. Each object's query sequence is ``[box, score, mask task tokens] + (projected
VRT features + vp_embedding)``; it cross-attends to a private copy of its image's memory, first the low-res
prototypes (one row per merged cell), then the high-res ViT states (one row per patch). The memory stream is
updated by image->query attention in every block. Heads read task tokens 0 (box), 1 (score) and 2 (mask).

Every stream is kept packed (objects concatenated along dim 0) with a :class:`~padt.model.decoder.attention.VarlenLayout`;
attention never crosses objects. Module names and parameter shapes are those of the released checkpoints'
``vl_decoder.*`` keys, so ``decoder.load_state_dict(sd_without_prefix, strict=True)`` loads them.

Ordering (spec 5.6): ``low_res_embeds`` are in raster merged order; ``high_res_embeds`` and ``visual_pe`` come in the
order named by ``feature_order``. With ``"window"`` (the authors', required by the released weights) they are in the
ViT's window order, the low-res PE is sub-patch 0 of each group of merge^2 PE rows, and the mask places high-res row p
of an image at patch (p // w, p % w) although the rows are not in raster order. ``"merge_block"`` is the
geometrically consistent alternative for models trained from scratch (see :func:`patch_positions`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from padt.model.decoder.attention import (
    ATTENTION_BACKENDS,
    VarlenLayout,
    apply_rotary,
    get_attention_backend,
    varlen_attention,
)

__all__ = [
    "FEATURE_ORDERS",
    "MASK_SUBPIXEL_SPLIT",
    "NUM_TASK_TOKENS",
    "PaDTDecoder",
    "RMSNorm",
    "TwoWayBlock",
    "VarlenAttention",
    "patch_positions",
]

NUM_TASK_TOKENS = 3  # rows of bbox_score_mask_tokens: 0 box, 1 score, 2 mask
# Checkpoint format of the mask upscaler: each of the two stages (mask_output_upscaling1/2) splits a vector into a
# SPLIT x SPLIT grid of sub-pixels, so one high-res row becomes a (SPLIT^2 x SPLIT^2) = 4 x 4 block of mask logits.
MASK_SUBPIXEL_SPLIT = 2

# Row order of high_res_embeds / visual_pe (same names as PaDTConfig.vrt_feature_order and padt.model.vision.encode_images).
FEATURE_ORDERS = ("window", "merge_block")

RotaryPE = tuple[torch.Tensor, torch.Tensor]


def _normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x * rstd, rstd)`` with ``rstd = rsqrt(mean(x^2) + eps)`` of shape (..., 1): the forward of every fp32 norm."""
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd, rstd


class _RMSNormFP32(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps))`` for fp32 ``x`` with a hand-written backward.

    The forward is the same arithmetic as the module's generic path; the backward saves only ``x_hat`` and the (..., 1)
    inverse rms and makes four passes over ``(..., D)`` instead of the ten or so of autograd's pow/mean/rsqrt/mul chain.
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


@functools.lru_cache(maxsize=8)
def _pair_interleaved_order(num_heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Output-channel order (0, d/2, 1, d/2 + 1, ...) within every head, as a `(heads * head_dim,)` index."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], -1).reshape(-1)  # head_dim
    return (torch.arange(num_heads)[:, None] * head_dim + within).reshape(-1).to(device)


def _rotate_pairs(x: torch.Tensor, rope: RotaryPE, token_dim: int = 0) -> torch.Tensor:
    """Rotary embedding of pair-interleaved channels: pair c of `x` (..., T, ..., head_dim) times e^{i theta_c}.

    `rope` holds the ViT's duplicated (cos, sin) tables `(T, head_dim)` (cos[c] == cos[c + d/2]), T along `token_dim`
    of `x`; in the channel order of `_pair_interleaved_order` this equals `apply_rotary`'s rotate-half rotation.
    """
    cos, sin = rope
    half = x.shape[-1] // 2
    phase = torch.complex(cos[:, :half].float(), sin[:, :half].float())
    shape = [1] * (x.dim() - 1) + [half]
    shape[token_dim] = x.shape[token_dim]
    return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], half, 2)) * phase.view(shape)).view(x.shape)


def _is_sharded(*params: torch.Tensor) -> bool:
    """True for DeepSpeed ZeRO-3 parameters: they are gathered only when their own module runs, so the fused paths
    below, which read other modules' weights directly, must not be used."""
    return any(hasattr(p, "ds_id") for p in params)


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


def _rms_norm_pair(x: torch.Tensor, norm_a: RMSNorm, norm_b: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm_a(x), norm_b(x))``, normalising ``x`` once when both are fp32 with the same eps."""
    if (
        x.dtype == torch.float32
        and norm_a.weight.dtype == torch.float32
        and norm_b.weight.dtype == torch.float32
        and norm_a.eps == norm_b.eps
        and not _is_sharded(norm_a.weight, norm_b.weight)
    ):
        return _RMSNormPairFP32.apply(x, norm_a.weight, norm_b.weight, norm_a.eps)
    return norm_a(x), norm_b(x)


class RMSNorm(nn.Module):
    """Qwen2-style RMSNorm: ``weight * (x / rms(x))``, normalised in fp32 then cast back before the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return _RMSNormFP32.apply(x, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class VarlenAttention(nn.Module):
    """Multi-head attention over packed segments (``q_proj``, ``k_proj``, ``v_proj``, ``proj``; all with bias).

    Rotary PE, when given, rotates the projected queries (`q_rope`) or keys (`k_rope`) per head.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.num_heads, self.head_dim)  # T x D -> T x N_heads x C_per_head

    def forward(
        self,
        q_in: torch.Tensor,
        k_in: torch.Tensor,
        v_in: torch.Tensor,
        layout_q: VarlenLayout,
        layout_k: VarlenLayout,
        *,
        q_rope: RotaryPE | None = None,
        k_rope: RotaryPE | None = None,
        implementation: str = "sdpa",
    ) -> torch.Tensor:
        """q_in (Tq, D); k_in, v_in (Tk, D); rotary tables (T, head_dim). Returns (Tq, D).

        With fp32 inputs, the sdpa/eager backends and equal segment lengths on both sides, the two lopsided cases of
        the decoder (few queries over a long memory, a long memory over few queries) are computed in a cheaper but
        mathematically identical order (see `attend_few_keys` / `attend_few_queries`); results agree with the
        plain path to fp32 rounding.
        """
        if self.uses_fast_path(q_in, layout_q, layout_k, implementation):
            q = self.project(q_in, self.q_proj, q_rope)
            k = self.project(k_in, self.k_proj, k_rope)
            if layout_k.max_len < layout_q.max_len:
                return self.attend_few_keys(q, k, self._heads(self.v_proj(v_in)), layout_q.num_segments)
            return self.attend_few_queries(q, k, v_in, layout_q.num_segments)
        q = self._heads(self.q_proj(q_in))
        k = self._heads(self.k_proj(k_in))
        v = self._heads(self.v_proj(v_in))
        if q_rope is not None:
            q = apply_rotary(q, *q_rope)
        if k_rope is not None:
            k = apply_rotary(k, *k_rope)
        out = varlen_attention(q, k, v, layout_q, layout_k, implementation)
        return self.proj(out.reshape(out.shape[0], -1))

    def uses_fast_path(
        self, x: torch.Tensor, layout_q: VarlenLayout, layout_k: VarlenLayout, implementation: str
    ) -> bool:
        """True when `attend_few_keys` / `attend_few_queries` compute this attention: fp32 input `x`, the sdpa/eager
        backend, equal segment lengths on both sides, one side short (heads * length <= width) and the other longer,
        and weights that are not ZeRO-3 shards (the fast paths read them directly)."""
        lq, lk = layout_q.max_len, layout_k.max_len
        span = self.num_heads * min(lq, lk)
        return (
            implementation in ("sdpa", "eager")
            and x.dtype == torch.float32
            and layout_q.is_uniform
            and layout_k.is_uniform
            and span <= x.shape[-1]
            and max(lq, lk) > span
            and not _is_sharded(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.proj.weight)
        )

    def project(self, x: torch.Tensor, linear: nn.Linear, rope: RotaryPE | None) -> torch.Tensor:
        """Projection to (T, heads, head_dim) in the *pair-interleaved* channel order of each head, rotated by `rope`.

        The fast paths only use q and k in dot products, which do not change when both sides' channels are permuted
        alike; in the order (0, d/2, 1, d/2 + 1, ...) the rotate-half rotary of channels c and c + d/2 is the complex
        product of adjacent pairs with e^{i theta_c}: one vectorised pass instead of `apply_rotary`'s strided
        half-head updates (about 2x faster here, forward and backward). The permutation is applied to the weight rows.
        """
        order = _pair_interleaved_order(self.num_heads, self.head_dim, x.device)
        x = self._heads(F.linear(x, linear.weight.index_select(0, order), linear.bias.index_select(0, order)))
        return _rotate_pairs(x, rope) if rope is not None else x

    def attend_few_keys(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_segments: int) -> torch.Tensor:
        """Uniform segments, Lk * heads <= D < Lq (the image->query attention of the memory stream).

        q (Tq, h, d) and k (Tk, h, d) come from `project` (rows may be strided), v (Tk, h, d). Returns (Tq, D).
        ``proj(softmax(q k^T) v)`` computed as ``softmax(q @ K_blk) @ V_proj + b``: ``K_blk`` (B, D, h*Lk) is the
        block-diagonal (per head) key matrix, so all heads' scores come from one product of the packed queries, and
        ``V_proj`` (B, h*Lk, D) pushes every head's values through its slice of the output projection first. This
        avoids the (Tq, D) x (D, D) output projection and the per-head layout copies.
        """
        h, d, b = self.num_heads, self.head_dim, num_segments
        lq, lk = q.shape[0] // b, k.shape[0] // b
        eye = torch.eye(h, dtype=q.dtype, device=q.device)
        k_blk = torch.einsum("bkhd,hg->bhdgk", k.reshape(b, lk, h, d) * (d**-0.5), eye).reshape(b, h * d, h * lk)
        # scores transposed, B x (h Lk) x Lq: the softmax then runs over a strided dim of size Lk with Lq contiguous,
        # which is far faster on CPU than a softmax over a tiny last dim
        scores_t = torch.bmm(q.reshape(b, lq, h * d), k_blk).transpose(1, 2).contiguous()
        probs_t = torch.softmax(scores_t.view(b, h, lk, lq), dim=2).view(b, h * lk, lq)
        w = self.proj.weight.view(-1, h, d)  # D_out x h x d
        v_proj = torch.einsum("bkhd,ohd->bhko", v.reshape(b, lk, h, d), w).reshape(b, h * lk, -1)  # B x (h Lk) x D
        out = torch.baddbmm(self.proj.bias, probs_t.transpose(1, 2), v_proj)  # B x Lq x D
        return out.reshape(b * lq, -1)

    def attend_few_queries(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v_in: torch.Tensor,
        num_segments: int,
        v_in_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Uniform segments, Lq * heads <= D < Lk (the query->image attention over the memory stream).

        q (Tq, h, d) and k (Tk, h, d) come from `project` (rows may be strided); v_in (Tk, D) is the *unprojected*
        value input, optionally still to be multiplied by `v_in_scale` (D,) per channel. Returns (Tq, D).
        ``softmax(q k^T) (v_in W_v^T + b_v)`` computed as ``(softmax(q k^T) v_in) W_v^T + b_v`` (softmax rows sum
        to 1): the long key side is mixed first (B, h*Lq, D) and the value projection runs on h*Lq rows per object
        instead of Lk. Scores of all heads come from one product with a block-diagonal (per head) query matrix.
        """
        h, d, b = self.num_heads, self.head_dim, num_segments
        lq, lk = q.shape[0] // b, k.shape[0] // b
        eye = torch.eye(h, dtype=q.dtype, device=q.device)
        q_blk = torch.einsum("blhd,hg->bhlgd", q.reshape(b, lq, h, d) * (d**-0.5), eye).reshape(b, h * lq, h * d)
        # scores transposed, B x Lk x (h Lq), so that the gradient of k comes out in k's own layout
        scores_t = torch.bmm(k.reshape(b, lk, h * d), q_blk.transpose(1, 2))
        probs_t = torch.softmax(scores_t, dim=1)
        mixed = torch.bmm(probs_t.transpose(1, 2), v_in.reshape(b, lk, -1)).view(b, h, lq, -1)  # B x h x Lq x D_in
        weight = self.v_proj.weight if v_in_scale is None else self.v_proj.weight * v_in_scale
        out = torch.einsum("bhlc,hdc->blhd", mixed, weight.view(h, d, -1)).reshape(b * lq, h * d) + self.v_proj.bias
        return self.proj(out)


class TwoWayBlock(nn.Module):
    """Pre-norm two-way block (spec 5.3): self-attn, query->image, MLP, image->query; all residual.

    Query positional embedding (`query_pe`, the initial queries) is added to q/k inputs on the query side; the
    memory side uses rotary PE on its own projection only (keys in query->image, queries in image->query).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        # registration order follows the checkpoint's key order
        self.norm1 = RMSNorm(hidden_size, eps)
        self.norm2 = RMSNorm(hidden_size, eps)
        self.norm3 = RMSNorm(hidden_size, eps)
        self.norm4 = RMSNorm(hidden_size, eps)
        self.self_attn = VarlenAttention(hidden_size, num_heads)
        self.cross_attn_query_to_image = VarlenAttention(hidden_size, num_heads)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, intermediate_size), nn.GELU(), nn.Linear(intermediate_size, hidden_size)
        )
        self.cross_attn_image_to_query = VarlenAttention(hidden_size, num_heads)
        self.norm5 = RMSNorm(hidden_size, eps)
        self.norm6 = RMSNorm(hidden_size, eps)

    def forward(
        self,
        queries: torch.Tensor,
        query_pe: torch.Tensor,
        memory: torch.Tensor,
        memory_pe: RotaryPE,
        layout_q: VarlenLayout,
        layout_m: VarlenLayout,
        implementation: str = "sdpa",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries/query_pe (Tq, D), memory (Tm, D), memory_pe (Tm, head_dim) x2 -> updated (queries, memory)."""
        x = self.norm1(queries)
        queries = queries + self.self_attn(
            x + query_pe, x + query_pe, x, layout_q, layout_q, implementation=implementation
        )
        x = self.norm2(queries)
        q2i, i2q = self.cross_attn_query_to_image, self.cross_attn_image_to_query
        fused = (
            q2i.uses_fast_path(queries, layout_q, layout_m, implementation)
            and i2q.uses_fast_path(memory, layout_m, layout_q, implementation)
            and self.norm3.eps == self.norm6.eps
            and not _is_sharded(self.norm3.weight, self.norm6.weight)
        )
        num_segments = layout_q.num_segments
        if fused:  # memory is unchanged until the block's end: normalise and project its two uses at once
            mem, k_mem, q_mem = self._memory_keys_and_queries(memory, memory_pe)
            queries = queries + q2i.attend_few_queries(
                q2i.project(x + query_pe, q2i.q_proj, None), k_mem, mem, num_segments, v_in_scale=self.norm3.weight
            )
        else:
            mem, mem_i2q = _rms_norm_pair(memory, self.norm3, self.norm6)
            queries = queries + q2i(
                x + query_pe, mem, mem, layout_q, layout_m, k_rope=memory_pe, implementation=implementation
            )
        queries = queries + self.mlp(self.norm4(queries))
        x = self.norm5(queries)
        if fused:
            update = i2q.attend_few_keys(
                q_mem, i2q.project(x + query_pe, i2q.k_proj, None), i2q._heads(i2q.v_proj(x)), num_segments
            )
        else:
            update = i2q(mem_i2q, x + query_pe, x, layout_m, layout_q, q_rope=memory_pe, implementation=implementation)
        return queries, memory + update

    def _memory_keys_and_queries(
        self, memory: torch.Tensor, memory_pe: RotaryPE
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The memory side of both cross-attentions from one normalisation and one matmul.

        ``k_proj(norm3(m))`` and ``q_proj(norm6(m))`` equal ``x_hat @ [W_k diag(w3) | W_q diag(w6)]^T + b`` with the
        unweighted ``x_hat = m / rms(m)``: the norm weights are folded into the projection rows, which are also put in
        the pair-interleaved order of `VarlenAttention.project` and rotated together.

        Returns:
            x_hat (Tm, D), keys of query->image (Tm, h, d) and queries of image->query (Tm, h, d), both rotated.
        """
        q2i, i2q = self.cross_attn_query_to_image, self.cross_attn_image_to_query
        heads, head_dim, rows = q2i.num_heads, q2i.head_dim, memory.shape[0]
        order = _pair_interleaved_order(heads, head_dim, memory.device)
        weight = torch.stack([q2i.k_proj.weight * self.norm3.weight, i2q.q_proj.weight * self.norm6.weight])
        weight = weight.index_select(1, order)  # 2 x D_out x D_in, rows pair-interleaved
        bias = torch.stack([q2i.k_proj.bias, i2q.q_proj.bias]).index_select(1, order)  # 2 x D_out
        x_hat = _RMSNormalizeFP32.apply(memory, self.norm3.eps)
        # 2 x Tm x D: one batched product whose two halves (keys, queries) each come out contiguous, as the
        # attention products that read them want (a (Tm, 2D) layout makes those products markedly slower on CPU)
        keys_queries = torch.baddbmm(bias[:, None, :], x_hat.expand(2, *x_hat.shape), weight.transpose(1, 2))
        keys_queries = _rotate_pairs(keys_queries.view(2, rows, heads, head_dim), memory_pe, token_dim=1)
        keys, queries = keys_queries.unbind(0)
        return x_hat, keys, queries


def _mlp(dims: Sequence[int], final: nn.Module | None = None) -> nn.Sequential:
    """Linear/GELU stack over `dims` (no activation after the last Linear unless `final` is given)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.GELU())
    if final is not None:
        layers.append(final)
    return nn.Sequential(*layers)


def patch_positions(
    index: torch.Tensor, grid_w: torch.Tensor | int, spatial_merge_size: int, feature_order: str = "window"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch (row, col) at which the mask head places high-res row `index` of an image `grid_w` patches wide.

    * ``"window"``: the authors' rule ``(index // grid_w, index % grid_w)``, i.e. rows read as a raster over the patch
      grid although the features arrive in window order (spec 5.6; the released decoders were trained with it).
    * ``"merge_block"``: rows grouped per merged cell (``merge**2`` sub-patches, row-major), cells in raster order.
    """
    if feature_order == "window":
        return index // grid_w, index % grid_w
    if feature_order == "merge_block":
        m = spatial_merge_size
        cell, sub = index // (m * m), index % (m * m)
        cells_w = grid_w // m
        return (cell // cells_w) * m + sub // m, (cell % cells_w) * m + sub % m
    raise ValueError(f"feature_order={feature_order!r}; expected one of {FEATURE_ORDERS}")


def _int_list(x: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(v) for v in (x.tolist() if torch.is_tensor(x) else x)]


def _segment_index(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """cat([arange(s, s + n) for s, n in zip(starts, lengths)]) without a Python loop; int64 (total = sum(lengths),)."""
    seg_starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(total, device=lengths.device) + torch.repeat_interleave(starts - seg_starts, lengths)


class PaDTDecoder(nn.Module):
    """Decodes per-object VRT features into a box, a score logit and mask logits.

    Args:
        hidden_size (`int`): decoder width D; must equal the ViT width (high-res states are added unprojected).
        intermediate_size (`int`): MLP width of each block.
        llm_hidden_size (`int`): width L of the VRT features and prototypes (the LLM width).
        num_heads (`int`): attention heads; head_dim = D / num_heads must equal the ViT rotary width.
        spatial_merge_size (`int`): ViT patches per merged cell side; high-res memory is merge^2 x the low-res one.
        use_mask_head (`bool`): default for `compute_mask` in `forward` (mask params always exist).
        attn_implementation (`str`): "sdpa", "eager" or "flash_attention_2".
        rms_norm_eps (`float`): eps of every RMSNorm.
        feature_order (`str`): row order of the high-res features and rotary PE, "window" (authors', needed by the
            released weights) or "merge_block"; decides where the mask head places each row (`patch_positions`).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        intermediate_size: int,
        llm_hidden_size: int,
        num_heads: int,
        spatial_merge_size: int = 2,
        use_mask_head: bool = True,
        attn_implementation: str = "sdpa",
        rms_norm_eps: float = 1e-6,
        feature_order: str = "window",
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("llm_hidden_size", llm_hidden_size),
            ("num_heads", num_heads),
            ("spatial_merge_size", spatial_merge_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if (hidden_size // num_heads) % 2:
            raise ValueError(f"head_dim {hidden_size // num_heads} must be even for rotary embeddings")
        mask_factor = MASK_SUBPIXEL_SPLIT**2  # channel reduction of one upscaling stage
        if hidden_size % (mask_factor * mask_factor):
            raise ValueError(
                f"hidden_size {hidden_size} must be divisible by {mask_factor * mask_factor} for the mask upscaler"
            )
        if rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {rms_norm_eps}")
        if feature_order not in FEATURE_ORDERS:
            raise ValueError(f"feature_order={feature_order!r}; expected one of {FEATURE_ORDERS}")
        get_attention_backend(attn_implementation)  # validates the name; flash-attn is imported at call time

        self.hidden_size = hidden_size
        self.llm_hidden_size = llm_hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.spatial_merge_size = spatial_merge_size
        self.use_mask_head = use_mask_head
        self.attn_implementation = attn_implementation
        self.feature_order = feature_order

        d = hidden_size
        self.vp_embedding = nn.Embedding(1, d)
        self.bbox_score_mask_tokens = nn.Embedding(NUM_TASK_TOKENS, d)
        self.input_projection = nn.Sequential(
            RMSNorm(llm_hidden_size, rms_norm_eps), nn.Linear(llm_hidden_size, d), nn.GELU(), nn.Linear(d, d)
        )
        self.low_res_transformer = TwoWayBlock(d, intermediate_size, num_heads, rms_norm_eps)
        self.high_res_transformer1 = TwoWayBlock(d, intermediate_size, num_heads, rms_norm_eps)
        self.high_res_transformer2 = TwoWayBlock(d, intermediate_size, num_heads, rms_norm_eps)
        self.high_res_norm = RMSNorm(d, rms_norm_eps)
        self.bbox_prediction = _mlp([d, d, d, 4], final=nn.Sigmoid())
        self.score_prediction = nn.Linear(d, 1)
        up1, up2 = d // mask_factor, d // (mask_factor * mask_factor)  # sub-pixel widths after stage 1 and 2
        self.mask_output_upscaling1 = nn.Sequential(
            nn.Linear(d, up1 * mask_factor), RMSNorm(d, rms_norm_eps), nn.GELU()
        )
        self.mask_output_upscaling2 = nn.Sequential(nn.Linear(up1, up2 * mask_factor), nn.GELU())
        self.mask_output_mlp = _mlp([d, d, d, up2])

    # ------------------------------------------------------------------ properties
    @property
    def mask_upscale(self) -> int:
        """Mask pixels per high-res patch side (4 for the checkpoint format)."""
        return MASK_SUBPIXEL_SPLIT * MASK_SUBPIXEL_SPLIT

    def set_attn_implementation(self, name: str) -> None:
        """Switch the attention backend ("sdpa", "eager", "flash_attention_2")."""
        get_attention_backend(name)
        self.attn_implementation = name

    @staticmethod
    def available_attn_implementations() -> list[str]:
        return sorted(ATTENTION_BACKENDS)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        vrt_features: torch.Tensor,
        vrt_lengths: Sequence[int] | torch.Tensor,
        low_res_embeds: torch.Tensor,
        high_res_embeds: torch.Tensor,
        visual_pe: RotaryPE,
        image_grid_thw: torch.Tensor,
        object_image_idx: Sequence[int] | torch.Tensor,
        compute_mask: bool | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Decode N objects.

        Args:
            vrt_features (`torch.Tensor` of shape `(sum(vrt_lengths), L)`): packed VRT features of all objects.
            vrt_lengths (`Sequence[int]` of length N): VRTs per object (each >= 1).
            low_res_embeds (`torch.Tensor` of shape `(sum_i n_i / merge^2, L)`): prototypes of all images,
                raster merged order, images concatenated.
            high_res_embeds (`torch.Tensor` of shape `(sum_i n_i, D)`): pre-merger ViT states, window order.
            visual_pe (`tuple` of two `torch.Tensor` of shape `(sum_i n_i, head_dim)`): ViT rotary (cos, sin).
            image_grid_thw (`torch.Tensor` of shape `(num_images, 3)`): (t, h, w) in patches; n_i = t*h*w, t = 1.
            object_image_idx (`Sequence[int]` of length N): the image each object belongs to.
            compute_mask (`bool`, *optional*): run the mask head; defaults to `use_mask_head`.

        Returns:
            dict with `pred_boxes` (N, 4) sigmoid (cx, cy, w, h); `pred_score` (N, 1) logits; `pred_mask`
            (N, s*H_max, s*W_max) logits, 0 outside each object's image (s = `mask_upscale`), or None.
        """
        compute_mask = self.use_mask_head if compute_mask is None else compute_mask
        dtype = self.input_projection[1].weight.dtype
        m2 = self.spatial_merge_size**2
        device = vrt_features.device
        vrt_lengths, object_image_idx, grid = self._check_inputs(
            vrt_features, vrt_lengths, low_res_embeds, high_res_embeds, visual_pe, image_grid_thw, object_image_idx
        )
        cos, sin = visual_pe
        n_high = grid.prod(-1)  # (num_images,) patches per image, on the host
        obj_grid = grid[torch.as_tensor(object_image_idx, dtype=torch.long)]  # N x 3, host
        hi_lens = obj_grid.prod(-1).tolist()
        obj_high_start = (torch.cumsum(n_high, 0) - n_high)[torch.as_tensor(object_image_idx)].to(device)
        obj_high_len = torch.as_tensor(hi_lens, dtype=torch.long, device=device)
        high_index = _segment_index(obj_high_start, obj_high_len, sum(hi_lens))  # (Tm_hi,) per-object copies
        low_index = _segment_index(obj_high_start // m2, obj_high_len // m2, sum(hi_lens) // m2)  # (Tm_lo,)

        # Row gathers use index_select: its backward (index_add_) is ~5x faster on CPU than that of x[index]
        # (an accumulating index_put), which matters for the per-object copies of the high-res memory.
        # ---- queries: [box, score, mask tokens; input_projection(vrt) + vp] per object
        lens = torch.as_tensor(vrt_lengths, dtype=torch.long, device=device)
        layout_q = VarlenLayout.from_lengths([n + NUM_TASK_TOKENS for n in vrt_lengths], device)
        layout_lo = VarlenLayout.from_lengths([n // m2 for n in hi_lens], device)
        layout_hi = VarlenLayout.from_lengths(hi_lens, device)
        vrt = self.input_projection(vrt_features.to(dtype)) + self.vp_embedding.weight  # ΣN_vrt x D
        pool = torch.cat([self.bbox_score_mask_tokens.weight, vrt], 0)  # (3 + ΣN_vrt) x D
        pos, seg = layout_q.positions, layout_q.segment_ids
        vrt_start = torch.cumsum(lens, 0) - lens
        queries = pool.index_select(0, torch.where(pos < NUM_TASK_TOKENS, pos, vrt_start[seg] + pos))  # Tq x D
        query_pe = queries  # the initial queries double as additive positional embedding
        q_starts = layout_q.cu_seqlens[:-1].long()
        impl = self.attn_implementation

        # ---- stage 1: low-res memory (projected once per image, then one copy per object)
        low_mem = self.input_projection(low_res_embeds.to(dtype)).index_select(0, low_index)  # Tm_lo x D
        # low-res PE: sub-patch 0 of each group of merge^2 PE rows (the authors' choice; window order by default)
        low_pe = tuple(t.reshape(-1, m2, t.shape[-1])[:, 0].index_select(0, low_index) for t in (cos, sin))
        queries, low_mem = self.low_res_transformer(queries, query_pe, low_mem, low_pe, layout_q, layout_lo, impl)

        # ---- stage 2: high-res memory = norm(each low-res row repeated merge^2 times + ViT states)
        high_pe = (cos.index_select(0, high_index), sin.index_select(0, high_index))
        high = high_res_embeds.to(dtype).index_select(0, high_index).view(-1, m2, self.hidden_size)  # Tm_lo x m2 x D
        memory = self.high_res_norm((low_mem[:, None, :] + high).view(-1, self.hidden_size))  # broadcast, no repeat
        for block in (self.high_res_transformer1, self.high_res_transformer2):
            queries, memory = block(queries, query_pe, memory, high_pe, layout_q, layout_hi, impl)

        # ---- heads on task tokens
        pred_boxes = self.bbox_prediction(queries.index_select(0, q_starts))
        pred_score = self.score_prediction(queries.index_select(0, q_starts + 1))
        pred_mask = None
        if compute_mask:
            obj_vec = self.mask_output_mlp(queries.index_select(0, q_starts + 2))  # N x C
            pred_mask = self._masks(memory, obj_vec, layout_hi, obj_grid)
        return {"pred_boxes": pred_boxes, "pred_score": pred_score, "pred_mask": pred_mask}

    def _masks(
        self, memory: torch.Tensor, obj_vec: torch.Tensor, layout: VarlenLayout, obj_grid: torch.Tensor
    ) -> torch.Tensor:
        """Mask logits (N, s*H_max, s*W_max) from high-res memory (Tm, D), object vectors (N, C), grids (N, 3)."""
        k = MASK_SUBPIXEL_SPLIT
        s = self.mask_upscale
        t_rows = memory.shape[0]
        x = self.mask_output_upscaling1(memory).view(t_rows, k, k, -1)  # Tm x a x b x D/4
        x = self.mask_output_upscaling2(x)  # Tm x a x b x (c1 c2 C)
        seg = layout.segment_ids
        if layout.is_uniform:  # one (L*s*s, C) @ (C,) product per object, no (Tm, s, s, C) temporary
            logits = torch.bmm(x.reshape(layout.num_segments, -1, obj_vec.shape[-1]), obj_vec[:, :, None])
        else:
            logits = (x.reshape(t_rows, s * s, -1) * obj_vec.index_select(0, seg)[:, None, :]).sum(-1)
        h_max, w_max = int(obj_grid[:, 1].max()), int(obj_grid[:, 2].max())  # host tensor, no device sync
        grid_w = obj_grid[:, 2].to(memory.device)[seg]
        row, col = patch_positions(layout.positions, grid_w, self.spatial_merge_size, self.feature_order)
        # logits come in (a, b, c1, c2) order; sub-pixel (a, b, c1, c2) sits at row a*k + c1, column b*k + c2 of the
        # row's s x s block. The scatter index follows that order, so the logits need no permuted copy.
        out_h, out_w = s * h_max, s * w_max
        part = torch.arange(k, device=memory.device)
        sub_row = part[:, None, None, None] * k + part[None, None, :, None]  # a x 1 x c1 x 1
        sub_col = part[None, :, None, None] * k + part[None, None, None, :]  # 1 x b x 1 x c2
        offsets = (sub_row * out_w + sub_col).reshape(-1)  # (s*s,) inside the block, in (a, b, c1, c2) order
        block = seg * (out_h * out_w) + row * (s * out_w) + col * s  # (Tm,) top-left pixel of each row's block
        flat = block[:, None] + offsets[None, :]  # Tm x s*s
        out = logits.new_zeros(layout.num_segments * out_h * out_w)
        out = out.index_put((flat.reshape(-1),), logits.reshape(-1))
        return out.view(layout.num_segments, out_h, out_w)

    # ------------------------------------------------------------------ validation
    def check_image_inputs(
        self,
        low_res_embeds: torch.Tensor,
        high_res_embeds: torch.Tensor,
        visual_pe: RotaryPE,
        image_grid_thw: torch.Tensor,
    ) -> torch.Tensor:
        """Validate the per-image memories against `image_grid_thw`; return the grid as a CPU int64 (I, 3) tensor.

        Raises:
            ValueError: naming the first inconsistent shape.
        """
        grid = torch.as_tensor(image_grid_thw).detach().to("cpu", torch.long)
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be (num_images, 3), got {tuple(grid.shape)}")
        m = self.spatial_merge_size
        if (grid[:, 0] != 1).any():
            raise ValueError(f"only still images (t == 1) are supported, got image_grid_thw {grid.tolist()}")
        if (grid[:, 1:] < 1).any() or (grid[:, 1:] % m != 0).any():
            raise ValueError(f"grid h and w must be positive multiples of spatial_merge_size {m}, got {grid.tolist()}")
        n_high = int(grid.prod(-1).sum())
        if low_res_embeds.dim() != 2 or tuple(low_res_embeds.shape) != (n_high // m**2, self.llm_hidden_size):
            raise ValueError(
                f"low_res_embeds must be ({n_high // m**2}, {self.llm_hidden_size}) for image_grid_thw "
                f"{grid.tolist()} and spatial_merge_size {m}, got {tuple(low_res_embeds.shape)}"
            )
        if high_res_embeds.dim() != 2 or tuple(high_res_embeds.shape) != (n_high, self.hidden_size):
            raise ValueError(
                f"high_res_embeds must be ({n_high}, {self.hidden_size}), got {tuple(high_res_embeds.shape)}"
            )
        if not isinstance(visual_pe, (tuple, list)) or len(visual_pe) != 2:
            raise ValueError("visual_pe must be a (cos, sin) pair of tensors")
        for name, t in zip(("cos", "sin"), visual_pe):
            if not torch.is_tensor(t) or t.dim() != 2 or tuple(t.shape) != (n_high, self.head_dim):
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"visual_pe {name} must be ({n_high}, {self.head_dim}), got {shape}")
        return grid

    def _check_inputs(self, vrt_features, vrt_lengths, low, high, visual_pe, image_grid_thw, object_image_idx):
        lengths, obj_img = _int_list(vrt_lengths), _int_list(object_image_idx)
        if not lengths:
            raise ValueError("PaDTDecoder.forward needs at least one object (vl_decode handles the empty case)")
        if len(obj_img) != len(lengths):
            raise ValueError(f"object_image_idx has {len(obj_img)} entries but vrt_lengths has {len(lengths)}")
        if min(lengths) < 1:
            raise ValueError(f"every object needs at least one VRT feature, got vrt_lengths {lengths}")
        if vrt_features.dim() != 2 or vrt_features.shape[1] != self.llm_hidden_size:
            raise ValueError(f"vrt_features must be (n, {self.llm_hidden_size}), got {tuple(vrt_features.shape)}")
        if vrt_features.shape[0] != sum(lengths):
            raise ValueError(f"vrt_features has {vrt_features.shape[0]} rows but vrt_lengths sum to {sum(lengths)}")
        grid = self.check_image_inputs(low, high, visual_pe, image_grid_thw)
        if min(obj_img) < 0 or max(obj_img) >= grid.shape[0]:
            raise ValueError(f"object_image_idx {obj_img} out of range for {grid.shape[0]} images")
        return lengths, obj_img, grid
