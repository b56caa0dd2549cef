"""The decoder's layers (`layers.py`), attention backends (`attention.py`) and fp32 kernels (`fused.py`).

The fp32 kernels must compute what the reference code computes: the decoder with the kernels switched off (the path
of the authors' bf16 recipe) is checked against the authors' recorded outputs and against the kernels' outputs and
gradients, and each kernel against its reference expression.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from padt.model.decoder import fused
from padt.model.decoder.attention import VarlenLayout, apply_rotary, varlen_attention
from padt.model.decoder.decoder import PaDTDecoder
from padt.model.decoder.layers import RMSNorm
from padt.model.decoder.vl_decode import vl_decode

ORACLE = Path(__file__).parent / "fixtures" / "oracle_ref"
FEATURE_SETS = ["decode_hidden", "decode_proto", "decode_synth", "decode_synth_empty0"]


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(ORACLE / "io.safetensors"))


@pytest.fixture(scope="module")
def decoder() -> PaDTDecoder:
    cfg = json.loads((ORACLE / "model" / "config.json").read_text())["vl_decoder"]
    dec = PaDTDecoder(
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        llm_hidden_size=cfg["llm_hidden_state"],
        num_heads=cfg["num_heads"],
        spatial_merge_size=cfg["spatial_merge_size"],
    )
    sd = load_file(str(ORACLE / "model" / "model.safetensors"))
    dec.load_state_dict({k[len("vl_decoder.") :]: v for k, v in sd.items() if k.startswith("vl_decoder.")})
    return dec.eval()


@pytest.fixture
def reference_only(monkeypatch):
    """Switch the fp32 kernels off: every layer runs its reference code, as in the authors' bf16 recipe."""
    monkeypatch.setattr(fused, "use_fused", lambda *args, **kwargs: False)


def _decode(decoder, io, feats, high=None):
    return vl_decode(
        decoder,
        feats,
        io["forward.past_image_embeds"],
        io["forward.past_high_res_image_embeds"] if high is None else high,
        io["inputs.image_grid_thw"],
        (io["forward.visual_pe_cos"], io["forward.visual_pe_sin"]),
        spatial_merge_size=decoder.spatial_merge_size,
    )


def _features(io, name):
    return [[io[k] for k in sorted(io) if k.startswith(f"{name}.feats.s{s}.")] for s in range(2)]


# ---------------------------------------------------------------------------------------------------- reference path
@pytest.mark.parametrize("name", FEATURE_SETS)
def test_reference_path_matches_authors_vl_decode(decoder, io, name, reference_only):
    with torch.no_grad():
        out = _decode(decoder, io, _features(io, name))
    for key, atol in (("pred_boxes", 1e-5), ("pred_score", 1e-5), ("pred_mask", 1e-4)):
        torch.testing.assert_close(out[key], io[f"{name}.{key}"], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("lengths", [(5, 5), (5, 5, 3)], ids=["equal_lengths", "mixed_lengths"])
def test_fused_path_equals_reference_path(decoder, io, lengths, monkeypatch):
    """Equal lengths over one image take the lopsided cross-attentions, mixed ones the shared-norm pair; both must
    give the reference code's outputs and gradients (decoder parameters, VRT features, high-res states)."""
    gen = torch.Generator().manual_seed(2)
    objects = [torch.randn(n, 128, generator=gen) for n in lengths]
    feats = [objects[:2], objects[2:]]
    results = []
    for use_fused in (fused.use_fused, lambda *args, **kwargs: False):
        monkeypatch.setattr(fused, "use_fused", use_fused)
        decoder.zero_grad(set_to_none=True)
        leaves = [[t.clone().requires_grad_(True) for t in group] for group in feats]
        high = io["forward.past_high_res_image_embeds"].clone().requires_grad_(True)
        out = _decode(decoder, io, leaves, high)
        loss = (out["pred_boxes"] * torch.arange(1.0, 5.0)).sum() + out["pred_score"].sum()
        (loss + (out["pred_mask"].sigmoid() * torch.linspace(-1, 1, out["pred_mask"].shape[-1])).sum()).backward()
        grads = {k: p.grad.clone() for k, p in decoder.named_parameters()}
        results.append((out, grads, [t.grad for group in leaves for t in group], high.grad))
    decoder.zero_grad(set_to_none=True)
    (fast, fast_p, fast_f, fast_h), (ref, ref_p, ref_f, ref_h) = results
    for key in ("pred_boxes", "pred_score", "pred_mask"):
        torch.testing.assert_close(fast[key], ref[key], atol=1e-5, rtol=1e-4)
    for key in ref_p:
        torch.testing.assert_close(fast_p[key], ref_p[key], atol=1e-4, rtol=1e-3, msg=lambda m, k=key: f"{k}: {m}")
    for got, want in zip(fast_f, ref_f):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(fast_h, ref_h, atol=1e-5, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------- kernels
def test_use_fused_needs_fp32_and_gathered_weights():
    x, w = torch.randn(3, 4), torch.ones(4)
    assert fused.use_fused(x, w)
    assert not fused.use_fused(x.bfloat16(), w)
    assert not fused.use_fused(x, w.bfloat16())
    w.ds_id = 7  # a DeepSpeed ZeRO-3 parameter: usable only inside its own module's forward
    assert not fused.use_fused(x, w)
    assert fused.use_fused(x, w, gathered=True)


def test_rms_norm_kernels_match_autograd_reference():
    torch.manual_seed(0)
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    w_a, w_b = (torch.rand(16, dtype=torch.float64).add(0.5).requires_grad_(True) for _ in range(2))
    eps = 1e-6

    def reference(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    torch.autograd.gradcheck(lambda x, w: fused.rms_norm(x, w, eps), (x, w_a))
    torch.autograd.gradcheck(lambda x: fused.rms_normalize(x, eps), (x,))
    torch.autograd.gradcheck(lambda x, a, b: fused._RMSNormPairFP32.apply(x, a, b, eps), (x, w_a, w_b))
    a, b = fused._RMSNormPairFP32.apply(x, w_a, w_b, eps)
    torch.testing.assert_close(a, reference(x, w_a))
    torch.testing.assert_close(b, reference(x, w_b))


def test_rotary_kernels_match_rotate_half():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    angle = torch.rand(5, 4, dtype=torch.float64) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    x1, x2 = x.chunk(2, dim=-1)
    reference = x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]
    torch.testing.assert_close(fused.rotary(x, cos[:, None], sin[:, None]), reference)
    torch.autograd.gradcheck(lambda x: fused.rotary(x, cos[:, None], sin[:, None]), (x,))
    order = fused._pair_interleaved_order(2, 8, x.device)  # rotate_half on pair-interleaved channels
    pairs = fused._rotate_pairs(x.reshape(5, 16)[:, order].reshape(5, 2, 8), (cos, sin))
    torch.testing.assert_close(pairs, reference.reshape(5, 16)[:, order].reshape(5, 2, 8))


# ------------------------------------------------------------------------------------- moved from test_decoder.py
def test_backends_agree_on_variable_lengths():
    torch.manual_seed(0)
    lq, lk = VarlenLayout.from_lengths([3, 1, 5]), VarlenLayout.from_lengths([4, 6, 2])
    q, k, v = torch.randn(9, 2, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    ref = []
    for i in range(3):
        qs = slice(int(lq.cu_seqlens[i]), int(lq.cu_seqlens[i + 1]))
        ks = slice(int(lk.cu_seqlens[i]), int(lk.cu_seqlens[i + 1]))
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q[qs], k[ks]) / 8**0.5, -1)
        ref.append(torch.einsum("hqk,khd->qhd", att, v[ks]))
    ref = torch.cat(ref)
    for impl in ("sdpa", "eager"):
        torch.testing.assert_close(varlen_attention(q, k, v, lq, lk, impl), ref, atol=1e-6, rtol=1e-5)
    x = torch.randn(9, 3)
    assert torch.equal(lq.unpad(lq.pad(x)), x)
    assert lq.pad(x)[1, 1:].abs().sum() == 0


def test_rotary_is_a_rotation_of_half_pairs():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 8)
    angle = torch.rand(5, 4) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    out = apply_rotary(x, cos, sin)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones_like(angle), angle)[:, None]
    torch.testing.assert_close(out, torch.cat([z.real, z.imag], -1), atol=1e-6, rtol=1e-5)


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16)
    torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-6))


def test_equal_length_fast_path_equals_padded_path(oracle_io_for_fast_path=None):
    """Objects with equal query and memory lengths take fused attention paths; adding an object of another length
    forces the padded varlen path. The shared objects must decode the same either way."""
    import torch
    from safetensors.torch import load_file

    from padt.model.backbones.qwen2_5_vl import PaDTForConditionalGeneration

    root = "tests/fixtures/oracle_ref"
    io = load_file(f"{root}/io.safetensors")
    model = PaDTForConditionalGeneration.from_pretrained(f"{root}/model", dtype=torch.float32).eval()
    pe = (io["forward.visual_pe_cos"], io["forward.visual_pe_sin"])
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, 128, generator=gen) for n in (5, 5, 3))
    args = (io["forward.past_image_embeds"], io["forward.past_high_res_image_embeds"], io["inputs.image_grid_thw"], pe)
    with torch.no_grad():
        fast = model.vl_decode([[a, b], []], *args)
        padded = model.vl_decode([[a, b], [c]], *args)
    torch.testing.assert_close(fast["pred_boxes"], padded["pred_boxes"][:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast["pred_score"], padded["pred_score"][:2], atol=1e-5, rtol=1e-4)
    h, w = fast["pred_mask"].shape[1:]
    torch.testing.assert_close(fast["pred_mask"], padded["pred_mask"][:2, :h, :w], atol=1e-4, rtol=1e-4)


def test_fast_path_gradients_equal_padded_path_gradients():
    """The fused paths (norm weights folded into one key|query projection, pair-interleaved complex rotary, scatter
    of un-permuted mask logits) must give the padded varlen path's gradients too, for every decoder parameter and for
    the VRT features and high-res states."""
    from padt.model.backbones.qwen2_5_vl import PaDTForConditionalGeneration

    io = load_file(ORACLE / "io.safetensors")
    model = PaDTForConditionalGeneration.from_pretrained(ORACLE / "model", dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(n, 128, generator=gen) for n in (5, 5, 3))
    pe = (io["forward.visual_pe_cos"], io["forward.visual_pe_sin"])
    grads = []
    for objects in ([[a, b], []], [[a, b], [c]]):
        feats = [[t.clone().requires_grad_(True) for t in group] for group in objects]
        high = io["forward.past_high_res_image_embeds"].clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        out = model.vl_decode(feats, io["forward.past_image_embeds"], high, io["inputs.image_grid_thw"], pe)
        h, w = 16, 16  # a common crop of every object's mask
        loss = (out["pred_boxes"][:2] * torch.arange(1.0, 5.0)).sum() + out["pred_score"][:2].sum()
        loss = loss + (out["pred_mask"][:2, :h, :w].sigmoid() * torch.linspace(-1, 1, w)).sum()
        loss.backward()
        params = {k: p.grad.clone() for k, p in model.vl_decoder.named_parameters() if p.grad is not None}
        grads.append((params, [t.grad for t in feats[0]], high.grad))
    (fast_p, fast_f, fast_h), (pad_p, pad_f, pad_h) = grads
    assert set(fast_p) == set(pad_p) and len(fast_p) > 50
    for key in fast_p:
        torch.testing.assert_close(fast_p[key], pad_p[key], atol=1e-4, rtol=1e-3, msg=lambda m, k=key: f"{k}: {m}")
    for got, want in zip(fast_f, pad_f):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(fast_h, pad_h, atol=1e-5, rtol=1e-3)
