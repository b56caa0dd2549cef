"""Building blocks of the PaDT decoder: `RMSNorm`, `make_mlp` and the two-way attention block `TwoWayBlock`.

This is the reference math, as the authors' `PaDTDecoderBlock` in `src/PaDT/models/padt_decoder.py` computes it
(docs/method.md#the-decoder). In fp32 the layers hand their work to the kernels of :mod:`padt.model.decoder.fused`
(same values, cheaper passes); those never run in the authors' bf16 recipe.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from padt.model.decoder import fused
from padt.model.decoder.attention import RotaryPE, VarlenAttention, VarlenLayout

__all__ = ["RMSNorm", "TwoWayBlock", "make_mlp"]


class RMSNorm(nn.Module):
    """Qwen2-style RMSNorm: ``weight * (x / rms(x))``, normalised in fp32 then cast back before the weight.

    Args:
        dim (`int`): width D of the last dimension.
        eps (`float`): added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D)."""
        if fused.use_fused(x, self.weight, gathered=True):
            return fused.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_mlp(dims: Sequence[int], final: nn.Module | None = None) -> nn.Sequential:
    """Linear/GELU stack over `dims` (no activation after the last Linear unless `final` is given)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.GELU())
    if final is not None:
        layers.append(final)
    return nn.Sequential(*layers)


class TwoWayBlock(nn.Module):
    """Pre-norm two-way block: self-attention, query->image, MLP, image->query; every stage residual.

    The query side adds its positional embedding `query_pe` (the initial queries) to the attention's q and k inputs;
    the memory side rotates its own projection by the ViT rotary `memory_pe` (the keys in query->image, the queries
    in image->query). Each object's queries attend only to its own copy of the image memory.

    Args:
        hidden_size (`int`): width D of queries and memory.
        intermediate_size (`int`): hidden width of the MLP.
        num_heads (`int`): attention heads.
        eps (`float`): eps of the six RMSNorms.
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
        self.mlp = make_mlp([hidden_size, intermediate_size, hidden_size])
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
        """Update the query and memory streams.

        Args:
            queries, query_pe (`torch.Tensor` of shape `(Tq, D)`): packed query tokens of all objects, segments in
                `layout_q`, and their positional embedding.
            memory (`torch.Tensor` of shape `(Tm, D)`): packed per-object image memory, segments in `layout_m`.
            memory_pe (`RotaryPE`): ViT rotary (cos, sin), each `(Tm, head_dim)`.
            implementation (`str`): attention backend.

        Returns:
            `(queries, memory)`, shaped like the inputs.
        """
        # fp32: the same four stages, norm3 and norm6 of the memory in one pass (and more, see fused.two_way_block)
        if fused.use_fused(memory, self.norm3.weight, self.norm6.weight):
            return fused.two_way_block(self, queries, query_pe, memory, memory_pe, layout_q, layout_m, implementation)
        impl = implementation
        # (1) self-attention of each object's tokens: q, k carry query_pe, v does not  # Tq x D
        x = self.norm1(queries)
        queries = queries + self.self_attn(x + query_pe, x + query_pe, x, layout_q, layout_q, implementation=impl)
        # (2) cross-attention, tokens -> image: keys and values from the memory, keys rotated by memory_pe
        x = self.norm2(queries)
        mem = self.norm3(memory)  # Tm x D
        queries = queries + self.cross_attn_query_to_image(
            x + query_pe, mem, mem, layout_q, layout_m, k_rope=memory_pe, implementation=impl
        )
        # (3) MLP on the tokens
        queries = queries + self.mlp(self.norm4(queries))
        # (4) cross-attention, image -> tokens: the memory as it entered the block, rotated, queries the new tokens
        x = self.norm5(queries)
        update = self.cross_attn_image_to_query(
            self.norm6(memory), x + query_pe, x, layout_m, layout_q, q_rope=memory_pe, implementation=impl
        )
        return queries, memory + update  # Tq x D, Tm x D
