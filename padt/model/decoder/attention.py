"""Attention of the PaDT decoder: packed variable-length segments, three backends, and the attention module.

The decoder keeps every stream *packed*: the tokens of all objects are concatenated along dim 0 and a
:class:`VarlenLayout` records where each object's segment starts (``cu_seqlens``), as flash-attention's varlen
API does. Attention pairs query segment ``i`` with key segment ``i`` only (no cross-object attention), is not
causal and has no dropout (docs/method.md#the-decoder; the authors' `PaDTDecoderFlashAttention2` in
`src/PaDT/models/padt_decoder.py`).

Backends (``ATTENTION_BACKENDS``; their names, ``ATTN_IMPLEMENTATIONS``, are what `PaDTConfig` and the training
arguments accept):

* ``"sdpa"`` (default): pad each segment to the longest one, run
  :func:`torch.nn.functional.scaled_dot_product_attention` with a key-padding mask, unpad.
* ``"eager"``: the same padding, plain ``matmul`` + fp32 ``softmax`` (a readable reference).
* ``"flash_attention_2"``: ``flash_attn.flash_attn_varlen_func`` on the packed tensors (GPU, fp16/bf16). The
  package is imported only when this backend is called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from padt.model.decoder import fused

__all__ = [
    "ATTENTION_BACKENDS",
    "ATTN_IMPLEMENTATIONS",
    "RotaryPE",
    "VarlenAttention",
    "VarlenLayout",
    "apply_rotary",
    "get_attention_backend",
    "varlen_attention",
]

RotaryPE = tuple[torch.Tensor, torch.Tensor]  # the ViT rotary (cos, sin) tables, each (T, head_dim)


@dataclass(frozen=True)
class VarlenLayout:
    """Where each segment of a packed ``(T, ...)`` tensor lives.

    Attributes:
        lengths (`list[int]`): segment lengths, one per object (all >= 1).
        cu_seqlens (`torch.Tensor` of shape `(B + 1,)`, int32): prefix sums of `lengths`, starting at 0.
        max_len (`int`): the longest segment.
        token_index (`torch.Tensor` of shape `(T,)`, int64): flat position of each packed token inside the
            padded `(B * max_len)` layout.
        key_mask (`torch.Tensor` of shape `(B, max_len)`, bool): True on real (non-padding) slots.
        segment_ids (`torch.Tensor` of shape `(T,)`, int64): the segment of each packed token.
        positions (`torch.Tensor` of shape `(T,)`, int64): each packed token's position inside its segment.
    """

    lengths: list[int]
    cu_seqlens: torch.Tensor
    max_len: int
    token_index: torch.Tensor
    key_mask: torch.Tensor
    segment_ids: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device | str | None = None) -> VarlenLayout:
        """Build the layout of `len(lengths)` segments; every length must be a positive int."""
        lengths = [int(n) for n in lengths]
        if not lengths:
            raise ValueError("VarlenLayout needs at least one segment")
        if min(lengths) < 1:
            raise ValueError(f"every segment needs at least one token, got lengths {lengths}")
        max_len = max(lengths)
        lens = torch.tensor(lengths, dtype=torch.long, device=device)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens, 0)
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)  # (T,) segment id
        pos = torch.arange(int(cu[-1]), device=device) - cu[:-1].long()[seg]  # (T,) position inside its segment
        key_mask = torch.arange(max_len, device=device)[None, :] < lens[:, None]  # B x max_len
        return cls(lengths, cu, max_len, seg * max_len + pos, key_mask, seg, pos)

    @property
    def num_segments(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return int(self.token_index.numel())

    @property
    def is_uniform(self) -> bool:
        """True when every segment has the same length (padding is then a plain reshape)."""
        return min(self.lengths) == self.max_len

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, *rest) -> (B, max_len, *rest), zeros in the padding slots (differentiable)."""
        if x.shape[0] != self.total:
            raise ValueError(f"packed tensor has {x.shape[0]} rows, layout expects {self.total}")
        if self.is_uniform:
            return x.reshape(self.num_segments, self.max_len, *x.shape[1:])
        out = x.new_zeros((self.num_segments * self.max_len, *x.shape[1:]))
        out = out.index_copy(0, self.token_index, x)
        return out.view(self.num_segments, self.max_len, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, max_len, *rest) -> (T, *rest), dropping the padding slots."""
        flat = x.reshape(self.num_segments * self.max_len, *x.shape[2:])
        if self.is_uniform:
            return flat
        return flat.index_select(0, self.token_index)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX (rotate-half) rotary embedding over the whole head, computed in fp32.

    Args:
        x (`torch.Tensor` of shape `(T, num_heads, head_dim)`): packed per-head features.
        cos, sin (`torch.Tensor` of shape `(T, head_dim)`): the duplicated ViT rotary tables (same row order as x).

    Returns:
        `torch.Tensor` like `x`: ``x * cos + rotate_half(x) * sin``, cast back to x's dtype.
    """
    cos = cos.float()[:, None, :]  # T x 1 x head_dim, shared by all heads
    sin = sin.float()[:, None, :]
    if fused.use_fused(x) and not (cos.requires_grad or sin.requires_grad):
        return fused.rotary(x, cos, sin)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def _padded_inputs(q, k, v, layout_q: VarlenLayout, layout_k: VarlenLayout):
    # (T, h, d) -> B x h x L x d
    qp = layout_q.pad(q).transpose(1, 2)
    kp = layout_k.pad(k).transpose(1, 2)
    vp = layout_k.pad(v).transpose(1, 2)
    mask = None if layout_k.is_uniform else layout_k.key_mask[:, None, None, :]  # B x 1 x 1 x Lk
    return qp, kp, vp, mask


def sdpa_varlen_attention(q, k, v, layout_q: VarlenLayout, layout_k: VarlenLayout, scale: float) -> torch.Tensor:
    """Segment-wise attention through torch SDPA on padded tensors with a key-padding mask."""
    qp, kp, vp, mask = _padded_inputs(q, k, v, layout_q, layout_k)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale)
    return layout_q.unpad(out.transpose(1, 2))


def eager_varlen_attention(q, k, v, layout_q: VarlenLayout, layout_k: VarlenLayout, scale: float) -> torch.Tensor:
    """Segment-wise attention with matmul + fp32 softmax (same result as sdpa)."""
    qp, kp, vp, mask = _padded_inputs(q, k, v, layout_q, layout_k)
    scores = torch.matmul(qp, kp.transpose(-1, -2)) * scale  # B x h x Lq x Lk
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(vp.dtype)
    return layout_q.unpad(torch.matmul(probs, vp).transpose(1, 2))


def flash_varlen_attention(q, k, v, layout_q: VarlenLayout, layout_k: VarlenLayout, scale: float) -> torch.Tensor:
    """Segment-wise attention through ``flash_attn.flash_attn_varlen_func`` (needs the flash-attn package)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (`pip install padt[flash]`, "
            "CUDA only); use attn_implementation='sdpa' or 'eager' otherwise"
        ) from err
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=layout_q.cu_seqlens,
        cu_seqlens_k=layout_k.cu_seqlens,
        max_seqlen_q=layout_q.max_len,
        max_seqlen_k=layout_k.max_len,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=False,
    )


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, VarlenLayout, VarlenLayout, float], torch.Tensor]

ATTENTION_BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_varlen_attention,
    "eager": eager_varlen_attention,
    "flash_attention_2": flash_varlen_attention,
}
ATTN_IMPLEMENTATIONS = tuple(ATTENTION_BACKENDS)  # ("sdpa", "eager", "flash_attention_2")


def get_attention_backend(name: str) -> AttentionFn:
    """Look up a backend by name; raise ValueError naming the valid choices otherwise."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attn_implementation {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout_q: VarlenLayout,
    layout_k: VarlenLayout,
    implementation: str = "sdpa",
) -> torch.Tensor:
    """Attention of packed query segment i over packed key segment i, for every i.

    Args:
        q (`torch.Tensor` of shape `(Tq, num_heads, head_dim)`): packed queries.
        k, v (`torch.Tensor` of shape `(Tk, num_heads, head_dim)`): packed keys and values.
        layout_q, layout_k (`VarlenLayout`): segment layouts with the same number of segments.
        implementation (`str`): a key of `ATTENTION_BACKENDS`.

    Returns:
        `torch.Tensor` of shape `(Tq, num_heads, head_dim)`; softmax scale is 1/sqrt(head_dim).
    """
    if layout_q.num_segments != layout_k.num_segments:
        raise ValueError(
            f"query layout has {layout_q.num_segments} segments but key layout has {layout_k.num_segments}"
        )
    backend = get_attention_backend(implementation)
    return backend(q, k, v, layout_q, layout_k, 1.0 / math.sqrt(q.shape[-1]))


class VarlenAttention(nn.Module):
    """Multi-head attention over packed segments (``q_proj``, ``k_proj``, ``v_proj``, ``proj``; all with bias).

    Rotary PE, when given, rotates the projected queries (`q_rope`) or keys (`k_rope`) per head; the decoder rotates
    one side only, the image memory's, so scores depend on the memory rows' absolute positions.

    Args:
        hidden_size (`int`): model width D (input and output).
        num_heads (`int`): attention heads; head_dim = D / num_heads.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def separate_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.num_heads, self.head_dim)  # T x D -> T x N_heads x C_per_head

    @staticmethod
    def recombine_heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)  # T x N_heads x C_per_head -> T x D

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
        """Attention of each query segment over its key segment.

        Args:
            q_in (`torch.Tensor` of shape `(Tq, D)`): packed query inputs, segments in `layout_q`.
            k_in, v_in (`torch.Tensor` of shape `(Tk, D)`): packed key and value inputs, segments in `layout_k`.
            q_rope, k_rope (`RotaryPE`, *optional*): (cos, sin) of shape `(Tq, head_dim)` / `(Tk, head_dim)`.
            implementation (`str`): one of `ATTN_IMPLEMENTATIONS`.

        Returns:
            `torch.Tensor` of shape `(Tq, D)`.
        """
        q = self.separate_heads(self.q_proj(q_in))  # Tq x N_heads x C_per_head
        k = self.separate_heads(self.k_proj(k_in))  # Tk x N_heads x C_per_head
        v = self.separate_heads(self.v_proj(v_in))
        if q_rope is not None:
            q = apply_rotary(q, *q_rope)
        if k_rope is not None:
            k = apply_rotary(k, *k_rope)
        out = varlen_attention(q, k, v, layout_q, layout_k, implementation)  # Tq x N_heads x C_per_head
        return self.proj(self.recombine_heads(out))
