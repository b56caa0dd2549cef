"""PaDTDecoder at widths the authors' decoder accepts although they are not multiples of 16 (e.g. 72, 70).

The authors' `PaDTDecoder` (`src/PaDT/models/padt_decoder.py`) lays the mask upscaler out with floor division:
``Linear(D, D // 4 * 4)``, ``RMSNorm(D // 4 * 4)``, ``Linear(D // 4, D // 16 * 4)`` and a mask MLP ending in
``D // 16`` channels. The reference below restates docs/method.md#the-decoder (heads) with plain torch ops on the
decoder's own weights and its hooked head inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model
from tiny_batch import Sample, build_batch

from padt import PaDTForConditionalGeneration
from padt.model.decoder.decoder import PaDTDecoder

LLM = 24


def authors_mask_shapes(d: int, inter: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the authors' mask head for width `d` (floor division, as their constructor)."""
    return {
        "mask_output_upscaling1.0.weight": (d // 4 * 4, d),
        "mask_output_upscaling1.0.bias": (d // 4 * 4,),
        "mask_output_upscaling1.1.weight": (d // 4 * 4,),
        "mask_output_upscaling2.0.weight": (d // 16 * 4, d // 4),
        "mask_output_upscaling2.0.bias": (d // 16 * 4,),
        "mask_output_mlp.4.weight": (d // 16, d),
        "mask_output_mlp.4.bias": (d // 16,),
    }


def make(d: int, heads: int, dtype=torch.float32) -> PaDTDecoder:
    torch.manual_seed(0)
    dec = PaDTDecoder(hidden_size=d, intermediate_size=2 * d, llm_hidden_size=LLM, num_heads=heads)
    with torch.no_grad():  # non-trivial norm weights and biases so that a wrong width or layout shows
        for p in dec.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return dec.to(dtype).eval()


def inputs(d: int, head_dim: int, grids: list[tuple[int, int]], dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(1)
    n = sum(h * w for h, w in grids)
    ang = torch.rand(n, head_dim // 2, generator=g) * 6
    return {  # drawn in fp32 whatever `dtype`, so that both dtypes see the same values
        "vrt_features": torch.randn(4, LLM, generator=g).to(dtype),
        "vrt_lengths": [1, 2, 1],
        "low_res_embeds": torch.randn(n // 4, LLM, generator=g).to(dtype),
        "high_res_embeds": torch.randn(n, d, generator=g).to(dtype),
        "pos_embeds": (torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)),
        "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids]),
        "object_image_idx": [0, len(grids) - 1, 0],
    }


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_heads(dec: PaDTDecoder, queries: torch.Tensor, memory: torch.Tensor, inp: dict) -> dict:
    """docs/method.md#the-decoder, heads: box MLP + sigmoid, score linear, and the mask as the authors compute it.

    `queries`: the final query stream (Tq, D); `memory`: the final high-res memory (Tm, D), one copy per object.
    """
    sd = {k: v.double() for k, v in dec.state_dict().items()}
    lens = inp["vrt_lengths"]
    starts = torch.tensor([0] + [sum(n + 3 for n in lens[:i + 1]) for i in range(len(lens) - 1)])
    q = queries.double()
    box_t, score_t, mask_t = q[starts], q[starts + 1], q[starts + 2]

    def mlp(prefix: str, x: torch.Tensor, n: int) -> torch.Tensor:
        for i in range(n):
            x = F.linear(x, sd[f"{prefix}.{2 * i}.weight"], sd[f"{prefix}.{2 * i}.bias"])
            if i < n - 1:
                x = F.gelu(x)
        return x

    boxes = torch.sigmoid(mlp("bbox_prediction", box_t, 3))
    score = F.linear(score_t, sd["score_prediction.weight"], sd["score_prediction.bias"])
    obj_vec = mlp("mask_output_mlp", mask_t, 3)  # N x D//16

    # mask: each high-res row -> 2x2 sub-pixels of D//4 channels -> 2x2 each of D//16 channels (authors' reshape)
    d = memory.shape[1]
    m = memory.double()
    up1 = F.gelu(rms(F.linear(m, sd["mask_output_upscaling1.0.weight"], sd["mask_output_upscaling1.0.bias"]),
                     sd["mask_output_upscaling1.1.weight"]))
    up1 = up1.reshape(-1, 2, 2, d // 4).permute(1, 2, 0, 3)  # 2, 2, Tm, D//4
    up2 = F.gelu(F.linear(up1, sd["mask_output_upscaling2.0.weight"], sd["mask_output_upscaling2.0.bias"]))
    up2 = up2.reshape(2, 2, -1, 2, 2, d // 16).permute(0, 3, 1, 4, 2, 5).flatten(0, 1).flatten(1, 2)  # 4, 4, Tm, C
    grids = inp["image_grid_thw"][inp["object_image_idx"]]
    h_max, w_max = int(grids[:, 1].max()), int(grids[:, 2].max())
    masks = torch.zeros(len(lens), 4 * h_max, 4 * w_max, dtype=torch.float64)
    row0 = 0
    for o, (_, h, w) in enumerate(grids.tolist()):
        for p in range(h * w):  # row p of the object's memory copy sits at patch (p // w, p % w)
            r, c = divmod(p, w)
            masks[o, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = up2[:, :, row0 + p] @ obj_vec[o]
        row0 += h * w
    return {"pred_boxes": boxes, "pred_score": score, "pred_mask": masks}


@pytest.mark.parametrize("d, heads", [(72, 4), (72, 6), (70, 5), (40, 2), (16, 2)])
def test_mask_head_has_the_authors_shapes_and_loads(d, heads):
    dec = PaDTDecoder(hidden_size=d, intermediate_size=2 * d, llm_hidden_size=LLM, num_heads=heads)
    shapes = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    assert {k: shapes[k] for k in authors_mask_shapes(d, 2 * d)} == authors_mask_shapes(d, 2 * d)
    # a checkpoint with these shapes loads strictly into a fresh decoder
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    PaDTDecoder(hidden_size=d, intermediate_size=2 * d, llm_hidden_size=LLM, num_heads=heads).load_state_dict(
        sd, strict=True
    )


@pytest.mark.parametrize("grids", [[(4, 6)], [(4, 6), (2, 4)]], ids=["uniform", "two_images"])
@pytest.mark.parametrize("d, heads", [(72, 4), (70, 5)])
def test_heads_match_reference_formulas(d, heads, grids):
    dec = make(d, heads)
    inp = inputs(d, d // heads, grids)
    seen = {}
    dec.mask_output_upscaling1.register_forward_pre_hook(lambda mod, a: seen.__setitem__("memory", a[0]))
    dec.high_res_transformer2.register_forward_hook(lambda mod, a, out: seen.__setitem__("queries", out[0]))
    with torch.no_grad():
        out = dec(**inp)
    ref = reference_heads(dec, seen["queries"], seen["memory"], inp)
    assert out["pred_mask"].shape == ref["pred_mask"].shape
    for k in ("pred_boxes", "pred_score", "pred_mask"):
        torch.testing.assert_close(out[k].double(), ref[k], atol=1e-5, rtol=1e-4)
    assert (out["pred_mask"] != 0).any()


def test_width_72_fp32_kernels_match_reference_layers_in_float64():
    """The fp32 path (fused kernels) and the reference layers (float64) compute the same function at width 72."""
    d, heads = 72, 4
    dec32 = make(d, heads)
    dec64 = make(d, heads, torch.float64)
    with torch.no_grad():
        out32 = dec32(**inputs(d, d // heads, [(4, 6), (2, 4)]))
        out64 = dec64(**inputs(d, d // heads, [(4, 6), (2, 4)], torch.float64))
    for k in ("pred_boxes", "pred_score", "pred_mask"):
        torch.testing.assert_close(out32[k].double(), out64[k], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("d, heads", [(8, 2), (12, 2)])
def test_width_under_16_is_rejected(d, heads):
    with pytest.raises(ValueError, match=r"hidden_size \d+ must be >= 16 for the mask upscaler"):
        PaDTDecoder(hidden_size=d, intermediate_size=2 * d, llm_hidden_size=LLM, num_heads=heads)


def test_model_with_width_72_saves_loads_and_decodes(tmp_path):
    """A tiny PaDT model whose ViT (and so decoder) width is 72 round-trips a checkpoint and decodes masks."""
    model = make_tiny_model(vision_hidden_size=72, vision_heads=6)  # head_dim 12: Qwen's ViT rotary needs 4 | it
    assert tuple(model.vl_decoder.state_dict()["mask_output_mlp.4.weight"].shape) == (72 // 16, 72)
    model.save_pretrained(tmp_path)
    loaded = PaDTForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = build_batch(model.config, [Sample(images=[(4, 6)])])
    outs = []
    for m in (model, loaded):
        with torch.no_grad():
            out = m(**batch, use_cache=False, output_hidden_states=True)
            feats = [[out.hidden_states[-1][0, -2:]]]
            outs.append(m.vl_decode(feats, out.past_image_embeds, out.past_high_res_image_embeds,
                                    batch["image_grid_thw"], out.past_visual_pe))
    assert outs[0]["pred_mask"].shape == (1, 16, 24)
    for k in ("pred_boxes", "pred_score", "pred_mask"):
        assert torch.equal(outs[0][k], outs[1][k])
