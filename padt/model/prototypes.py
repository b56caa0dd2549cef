"""PaDT's dynamic embedding: visual prototypes, the extended input table and the extended classifier
(docs/method.md#visual-reference-prototypes, #vrt-ids-and-the-extended-vocabulary).

Instead of concatenating `[embed_tokens.weight; P]` at every call (the authors rebuild the full table twice per decode
step), ids below V are embedded by the text table and ids >= V by gathering prototype rows; the classifier computes
`lm_head(h)` and `h @ P^T` and concatenates the two, which is the same function at a fraction of the memory traffic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ZeroInitLayerNorm(nn.LayerNorm):
    """LayerNorm whose weight and bias start at zero (`PaDTModelMixin._init_weights` zeroes both), so every prototype
    is exactly 0 at initialisation (docs/method.md#visual-reference-prototypes)."""


class VisualPrototypeProjection(nn.Module):
    """Prototypes `P = LN0(E) + W2 W1 LN0(E)` from merged image embeddings E; state-dict keys of the released
    checkpoints are the model's top-level `vis_norm.*` and `vis_proj.{0,1}.weight`, so the model owns the two submodules
    and this class only holds the formula."""

    @staticmethod
    def apply(image_embeds: torch.Tensor, norm: nn.Module | None, proj: nn.Module | None) -> torch.Tensor:
        """Args:
            image_embeds (`torch.Tensor` of shape `(N_cells, H)`): merger output E.
            norm, proj: `vis_norm` and `vis_proj`; `None` (ablation without projection) returns a clone of E.
        Returns:
            `torch.Tensor` of shape `(N_cells, H)`.
        """
        if norm is None or proj is None:
            return image_embeds.clone()
        x = norm(image_embeds)
        return x + proj(x)


def build_vis_proj(hidden_size: int, rank: int) -> nn.Sequential:
    """`vis_proj`: Linear(H -> r) then Linear(r -> H), no biases (keys `vis_proj.0.weight`, `vis_proj.1.weight`)."""
    return nn.Sequential(nn.Linear(hidden_size, rank, bias=False), nn.Linear(rank, hidden_size, bias=False))


def embed_with_prototypes(
    input_ids: torch.Tensor,
    embed_tokens: nn.Embedding,
    prototypes: torch.Tensor | None,
    vrt_base_id: int,
    is_vrt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embed ids through the extended table `[embed_tokens; P]` without building it.

    Args:
        input_ids (`torch.LongTensor` of shape `(B, L)`): text ids `< V` and global VRT ids `V + j`.
        prototypes (`torch.Tensor` of shape `(N_cells, H)`, *optional*): rows for ids >= V; None when the ids hold
            no VRT (the plain embedding lookup).
        is_vrt (`torch.BoolTensor` of shape `(B, L)`, *optional*): `input_ids >= V` when the caller has it.
    Returns:
        `torch.Tensor` of shape `(B, L, H)`.
    """
    if prototypes is None:
        return embed_tokens(input_ids)
    is_vrt = input_ids >= vrt_base_id if is_vrt is None else is_vrt
    # both tables are read at every position (VRT ids read text row V-1, text ids prototype 0) and `where` keeps the
    # right row: no nonzero/host sync and fewer ops than scattering only the VRT rows, for one extra (B, L, H) buffer
    text = embed_tokens(input_ids.clamp(max=vrt_base_id - 1))
    vrt = F.embedding((input_ids - vrt_base_id).clamp_(min=0), prototypes.to(text.dtype))
    return torch.where(is_vrt[..., None], vrt, text)


def extended_logits(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    prototypes_t: torch.Tensor | None,
    vrt_bias: torch.Tensor | None = None,
    blocked_text_rows: slice | None = None,
) -> torch.Tensor:
    """Logits over text ids and VRT ids, `-inf` where a row may not emit
    (docs/method.md#vrt-ids-and-the-extended-vocabulary).

    Args:
        hidden (`torch.Tensor` of shape `(B, L, H)`): final-norm hidden states.
        lm_head: the text classifier (tied to `embed_tokens` when `tie_word_embeddings`, as the 3B).
        prototypes_t (`torch.Tensor` of shape `(H, N_cells)`, *optional*): `P^T` in `hidden`'s dtype, the classifier
            columns of the VRT ids (`VRTImageState.prototypes_t`, built once per image state).
        vrt_bias (`torch.Tensor` of shape `(B, 1, N_cells)`, *optional*): added to the VRT logits, 0 where a row may
            emit a prototype and `-inf` where not (`VRTImageState.vrt_logit_bias`); None when every row may emit all.
        blocked_text_rows: text ids to mask as well (unused embedding rows), or None.
    Returns:
        `torch.Tensor` of shape `(B, L, V + N_cells)` (or `(B, L, V)` without prototypes).
    """
    text = lm_head(hidden)
    if blocked_text_rows is not None:
        text[..., blocked_text_rows] = float("-inf")
    if prototypes_t is None or prototypes_t.shape[1] == 0:
        return text
    # (B, L, N_cells); mm on the folded rows: matmul would expand + bmm for a strided slice such as `hidden[:, -1:]`
    vrt = torch.mm(hidden.reshape(-1, hidden.shape[-1]), prototypes_t).view(*hidden.shape[:-1], -1)
    if vrt_bias is not None:
        vrt += vrt_bias
    return torch.cat([text, vrt], dim=-1)
