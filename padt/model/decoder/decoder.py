"""The PaDT box / score / mask decoder: the authors' `PaDTDecoder` in `src/PaDT/models/padt_decoder.py`
(docs/method.md#the-decoder).

A SAM-style two-way transformer. Each object's query sequence is ``[box, score, mask task tokens] + (projected
VRT features + vp_embedding)``; it cross-attends to a private copy of its image's memory, first the low-res
prototypes (one row per merged cell), then the high-res ViT states (one row per patch). The memory stream is
updated by image->query attention in every block. Heads read task tokens 0 (box), 1 (score) and 2 (mask).

Every stream is kept packed (objects concatenated along dim 0) with a
:class:`~padt.model.decoder.attention.VarlenLayout`; attention never crosses objects. Module names and parameter
shapes are those of the released checkpoints' ``vl_decoder.*`` keys (docs/method.md#checkpoint-format), so
``decoder.load_state_dict(sd_without_prefix, strict=True)`` loads them. The blocks live in
:mod:`~padt.model.decoder.layers`, the attention in :mod:`~padt.model.decoder.attention`.

Ordering (docs/method.md#feature-order): ``low_res_embeds`` are in raster merged order; ``high_res_embeds`` and
``pos_embeds`` come in the order named by ``feature_order``. With ``"window"`` (the authors', required by the released
weights) they are in the ViT's window order, the low-res PE is sub-patch 0 of each group of merge^2 PE rows, and the
mask places high-res row p of an image at patch (p // w, p % w) although the rows are not in raster order.
``"merge_block"`` is the geometrically consistent alternative for models trained from scratch (see
:func:`patch_positions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from padt.model.decoder.attention import RotaryPE, VarlenLayout, get_attention_backend
from padt.model.decoder.layers import RMSNorm, TwoWayBlock, make_mlp

__all__ = ["FEATURE_ORDERS", "MASK_SUBPIXEL_SPLIT", "NUM_TASK_TOKENS", "PaDTDecoder", "patch_positions"]

NUM_TASK_TOKENS = 3  # rows of bbox_score_mask_tokens: 0 box, 1 score, 2 mask
# Checkpoint format of the mask upscaler: each of the two stages (mask_output_upscaling1/2) splits a vector into a
# SPLIT x SPLIT grid of sub-pixels, so one high-res row becomes a (SPLIT^2 x SPLIT^2) = 4 x 4 block of mask logits.
MASK_SUBPIXEL_SPLIT = 2

# Row orders of high_res_embeds / pos_embeds: the one definition, also used by PaDTConfig.vrt_feature_order and
# padt.model.vision.encode_images.
FEATURE_ORDERS = ("window", "merge_block")


def patch_positions(
    index: torch.Tensor, grid_w: torch.Tensor | int, spatial_merge_size: int, feature_order: str = "window"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch (row, col) at which the mask head places high-res row `index` of an image `grid_w` patches wide.

    * ``"window"``: the authors' rule ``(index // grid_w, index % grid_w)``, i.e. rows read as a raster over the patch
      grid although the features arrive in window order (docs/method.md#feature-order; the released decoders were
      trained with it).
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
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop: int64 `(total,)`."""
    seg_starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(total, device=lengths.device) + torch.repeat_interleave(starts - seg_starts, lengths)


class PaDTDecoder(nn.Module):
    """Decodes per-object VRT features into a box, a score logit and mask logits.

    Args:
        hidden_size (`int`): decoder width D; must equal the ViT width (high-res states are added unprojected). Any
            width >= 16 that `num_heads` divides; the mask upscaler uses D // 4 and D // 16 channels, as the authors'.
        intermediate_size (`int`): MLP width of each block.
        llm_hidden_size (`int`): width L of the VRT features and prototypes (the LLM width).
        num_heads (`int`): attention heads; head_dim = D / num_heads must equal the ViT rotary width.
        spatial_merge_size (`int`): ViT patches per merged cell side; high-res memory is merge^2 x the low-res one.
        use_mask_head (`bool`): default for `compute_mask` in `forward` (mask params always exist).
        attn_implementation (`str`): one of `ATTN_IMPLEMENTATIONS` ("sdpa", "eager", "flash_attention_2").
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
        # The authors lay the upscaler out with floor division (D // 4, D // 16), so any width works; only a width
        # under 16 leaves the mask embeddings with no channel (every mask logit would be 0).
        if hidden_size < mask_factor * mask_factor:
            raise ValueError(
                f"hidden_size {hidden_size} must be >= {mask_factor * mask_factor} for the mask upscaler "
                f"(its sub-pixel embeddings have hidden_size // {mask_factor * mask_factor} channels)"
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
        self.bbox_prediction = make_mlp([d, d, d, 4], final=nn.Sigmoid())
        self.score_prediction = nn.Linear(d, 1)
        # sub-pixel widths after stage 1 and 2, floor-divided as in the authors' code: for D not divisible by 16 the
        # stage outputs (up1 * 4, up2 * 4) are narrower than D and D // 4.
        up1, up2 = d // mask_factor, d // (mask_factor * mask_factor)
        self.mask_output_upscaling1 = nn.Sequential(
            nn.Linear(d, up1 * mask_factor), RMSNorm(up1 * mask_factor, rms_norm_eps), nn.GELU()
        )
        self.mask_output_upscaling2 = nn.Sequential(nn.Linear(up1, up2 * mask_factor), nn.GELU())
        self.mask_output_mlp = make_mlp([d, d, d, up2])

    # ------------------------------------------------------------------ properties
    @property
    def mask_upscale(self) -> int:
        """Mask pixels per high-res patch side (4 for the checkpoint format)."""
        return MASK_SUBPIXEL_SPLIT * MASK_SUBPIXEL_SPLIT

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        vrt_features: torch.Tensor,
        vrt_lengths: Sequence[int] | torch.Tensor,
        low_res_embeds: torch.Tensor,
        high_res_embeds: torch.Tensor,
        pos_embeds: RotaryPE,
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
            pos_embeds (`tuple` of two `torch.Tensor` of shape `(sum_i n_i, head_dim)`): ViT rotary (cos, sin).
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
            vrt_features, vrt_lengths, low_res_embeds, high_res_embeds, pos_embeds, image_grid_thw, object_image_idx
        )
        cos, sin = pos_embeds
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
        # each upscaling stage splits a row's vector into a k x k grid of sub-pixels: (a, b), then (c1, c2)
        x = rearrange(self.mask_output_upscaling1(memory), "t (a b c) -> t a b c", a=k, b=k)  # Tm x a x b x D//4
        x = self.mask_output_upscaling2(x)  # Tm x a x b x (c1 c2 C)
        seg = layout.segment_ids
        if layout.is_uniform:  # one (L*s*s, C) @ (C,) product per object, no (Tm, s, s, C) temporary
            x = rearrange(x, "(n l) a b (c1 c2 c) -> n (l a b c1 c2) c", n=layout.num_segments, c1=k, c2=k)
            logits = torch.bmm(x, obj_vec[:, :, None])  # N x (L a b c1 c2) x 1
        else:
            x = rearrange(x, "t a b (c1 c2 c) -> t (a b c1 c2) c", c1=k, c2=k)
            logits = (x * obj_vec.index_select(0, seg)[:, None, :]).sum(-1)  # Tm x (a b c1 c2)
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
        pos_embeds: RotaryPE,
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
        if not isinstance(pos_embeds, (tuple, list)) or len(pos_embeds) != 2:
            raise ValueError("visual_pe must be a (cos, sin) pair of tensors")
        for name, t in zip(("cos", "sin"), pos_embeds):
            if not torch.is_tensor(t) or t.dim() != 2 or tuple(t.shape) != (n_high, self.head_dim):
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"visual_pe {name} must be ({n_high}, {self.head_dim}), got {shape}")
        return grid

    def _check_inputs(self, vrt_features, vrt_lengths, low, high, pos_embeds, image_grid_thw, object_image_idx):
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
        grid = self.check_image_inputs(low, high, pos_embeds, image_grid_thw)
        if min(obj_img) < 0 or max(obj_img) >= grid.shape[0]:
            raise ValueError(f"object_image_idx {obj_img} out of range for {grid.shape[0]} images")
        return lengths, obj_img, grid
