"""PaDTDecoder + vl_decode against the authors' recorded outputs (tests/fixtures/oracle_ref) and behaviour checks.

The layers, the attention backends and the fp32 kernels are tested in tests/test_decoder_layers.py."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from padt.model.decoder.decoder import PaDTDecoder, patch_positions
from padt.model.decoder.vl_decode import vl_decode

ORACLE = Path(__file__).parent / "fixtures" / "oracle_ref"
FEATURE_SETS = ["decode_hidden", "decode_proto", "decode_synth", "decode_synth_empty0"]
PREFIX = "vl_decoder."


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(ORACLE / "io.safetensors"))


@pytest.fixture(scope="module")
def decoder_state() -> dict[str, torch.Tensor]:
    sd = load_file(str(ORACLE / "model" / "model.safetensors"))
    return {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def decoder_kwargs() -> dict:
    cfg = json.loads((ORACLE / "model" / "config.json").read_text())["vl_decoder"]
    return {
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "llm_hidden_size": cfg["llm_hidden_state"],
        "num_heads": cfg["num_heads"],
        "spatial_merge_size": cfg["spatial_merge_size"],
    }


def make_decoder(decoder_kwargs, decoder_state, **overrides) -> PaDTDecoder:
    dec = PaDTDecoder(**{**decoder_kwargs, **overrides})
    dec.load_state_dict(decoder_state, strict=True)
    return dec.eval()


@pytest.fixture(scope="module")
def decoder(decoder_kwargs, decoder_state) -> PaDTDecoder:
    return make_decoder(decoder_kwargs, decoder_state)


def image_inputs(io) -> dict:
    return {
        "low_res_image_embeds": io["forward.past_image_embeds"],
        "high_res_image_embeds": io["forward.past_high_res_image_embeds"],
        "image_grid_thws": io["inputs.image_grid_thw"],
        "visual_pes": (io["forward.visual_pe_cos"], io["forward.visual_pe_sin"]),
    }


def feature_lists(io, name: str, num_samples: int = 2) -> list[list[torch.Tensor]]:
    """`decode_*.feats.s{i}.o{j}` as a list per sample; a missing sample has no objects."""
    out = []
    for s in range(num_samples):
        objs, j = [], 0
        while f"{name}.feats.s{s}.o{j}" in io:
            objs.append(io[f"{name}.feats.s{s}.o{j}"])
            j += 1
        out.append(objs)
    return out


def decode(decoder, io, feats, **kwargs) -> dict:
    return vl_decode(decoder, feats, **image_inputs(io), spatial_merge_size=decoder.spatial_merge_size, **kwargs)


def assert_close(got, ref, atol, rtol):
    assert got.shape == ref.shape, (got.shape, ref.shape)
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------- checkpoint
def test_state_dict_matches_checkpoint_keys_and_shapes(decoder_kwargs, decoder_state):
    dec = PaDTDecoder(**decoder_kwargs)
    ours = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in decoder_state.items()}
    assert ours == theirs
    assert sum(p.numel() for p in dec.parameters()) == 235225  # oracle README: vl_decoder.* params


# ---------------------------------------------------------------------------------------------------- oracle parity
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FEATURE_SETS)
def test_matches_authors_vl_decode(decoder_kwargs, decoder_state, io, name, impl):
    dec = make_decoder(decoder_kwargs, decoder_state, attn_implementation=impl)
    with torch.no_grad():
        out = decode(dec, io, feature_lists(io, name))
    assert_close(out["pred_boxes"], io[f"{name}.pred_boxes"], atol=1e-5, rtol=1e-4)
    assert_close(out["pred_score"], io[f"{name}.pred_score"], atol=1e-5, rtol=1e-4)
    assert_close(out["pred_mask"], io[f"{name}.pred_mask"], atol=1e-4, rtol=1e-4)
    valid_h, valid_w = out["pred_mask_valid_hw"]
    assert valid_h.dtype == valid_w.dtype == torch.int64
    assert torch.equal(valid_h, io[f"{name}.pred_mask_valid_h"])
    assert torch.equal(valid_w, io[f"{name}.pred_mask_valid_w"])
    assert out["sample_idx"] == io[f"{name}.sample_idx"].tolist()


def test_each_object_alone_equals_batch(decoder, io):
    feats = feature_lists(io, "decode_synth")
    with torch.no_grad():
        batch = decode(decoder, io, feats)
        k = 0
        for s, objs in enumerate(feats):
            for f in objs:
                alone = decode(decoder, io, [[f] if b == s else [] for b in range(len(feats))])
                assert alone["sample_idx"] == [s]
                h, w = (int(x[0]) for x in alone["pred_mask_valid_hw"])
                torch.testing.assert_close(alone["pred_boxes"][0], batch["pred_boxes"][k], atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(alone["pred_score"][0], batch["pred_score"][k], atol=1e-6, rtol=1e-5)
                assert alone["pred_mask"].shape[1:] == (4 * h, 4 * w)
                torch.testing.assert_close(
                    alone["pred_mask"][0], batch["pred_mask"][k, : 4 * h, : 4 * w], atol=1e-5, rtol=1e-5
                )
                assert batch["pred_mask"][k, 4 * h :].abs().sum() == 0  # padding is 0 logits
                assert batch["pred_mask"][k, :, 4 * w :].abs().sum() == 0
                k += 1


def test_samples_with_several_images_or_none(decoder, io):
    objs = [o for sample in feature_lists(io, "decode_synth") for o in sample]  # images 0, 0, 1
    with torch.no_grad():
        out = decode(decoder, io, [[], objs], image_sample_idx=torch.tensor([1, 1]), object_image_idx=[[], [0, 0, 1]])
    assert out["sample_idx"] == [1, 1, 1]
    assert out["object_image_idx"] == [0, 0, 1]
    assert_close(out["pred_boxes"], io["decode_synth.pred_boxes"], atol=1e-5, rtol=1e-4)
    assert_close(out["pred_mask"], io["decode_synth.pred_mask"], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="object_image_idx"):  # two images, no assignment
        decode(decoder, io, [[], objs], image_sample_idx=[1, 1])
    with pytest.raises(ValueError, match="not one of the sample's images"):
        decode(decoder, io, [objs[:1], []], image_sample_idx=[0, 1], object_image_idx=[[1], []])


# ---------------------------------------------------------------------------------------------------- dtype
def test_cast_to_bfloat16_after_construction(decoder_kwargs, decoder_state, io):
    feats = feature_lists(io, "decode_synth")
    dec = make_decoder(decoder_kwargs, decoder_state)
    with torch.no_grad():
        ref = decode(dec, io, feats)
        dec = dec.to(torch.bfloat16)
        out = decode(dec, io, feats)  # fp32 inputs are cast to the decoder's dtype at call time
    for key in ("pred_boxes", "pred_score", "pred_mask"):
        assert out[key].dtype == torch.bfloat16
        assert torch.isfinite(out[key]).all()
    torch.testing.assert_close(out["pred_boxes"].float(), ref["pred_boxes"], atol=0.05, rtol=0.05)
    torch.testing.assert_close(out["pred_score"].float(), ref["pred_score"], atol=0.1, rtol=0.05)
    torch.testing.assert_close(out["pred_mask"].float(), ref["pred_mask"], atol=0.15, rtol=0.05)


# ---------------------------------------------------------------------------------------------------- empty / dummy
def test_empty_batch_returns_empty_without_running(decoder, io):
    calls = []
    handle = decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = decode(decoder, io, [[], []])
    finally:
        handle.remove()
    assert calls == []
    assert out["pred_boxes"].shape == (0, 4)
    assert out["pred_score"].shape == (0, 1)
    assert out["pred_mask"].shape == (0, 8, 8)  # mask_upscale (4) * spatial_merge_size (2)
    assert [t.shape for t in out["pred_mask_valid_hw"]] == [(0,), (0,)]
    assert out["sample_idx"] == []
    assert float(out["dummy_loss"]) == 0.0


def test_dummy_pass_reaches_every_parameter(decoder_kwargs, decoder_state, io):
    dec = make_decoder(decoder_kwargs, decoder_state).train()
    out = decode(dec, io, [[], []], dummy_when_empty=True)
    assert out["pred_boxes"].shape == (0, 4)
    loss = out["pred_boxes"].sum() + out["dummy_loss"]
    assert float(loss.detach()) == 0.0
    loss.backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in dec.parameters())


def test_normal_pass_gradients_reach_every_parameter(decoder_kwargs, decoder_state, io):
    dec = make_decoder(decoder_kwargs, decoder_state).train()
    out = decode(dec, io, feature_lists(io, "decode_synth"))
    (out["pred_boxes"].sum() + out["pred_score"].sum() + out["pred_mask"].pow(2).mean()).backward()
    assert [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []


# ---------------------------------------------------------------------------------------------------- attention
def test_flash_attention_backend(decoder_kwargs, decoder_state, io, monkeypatch):
    dec = make_decoder(decoder_kwargs, decoder_state, attn_implementation="flash_attention_2")
    feats = feature_lists(io, "decode_synth")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    with pytest.raises(ImportError, match="flash-attn"):
        decode(dec, io, feats)

    seen = []

    def fake_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal):
        seen.append((int(max_seqlen_q), int(max_seqlen_k)))
        assert not causal and dropout_p == 0.0
        outs = []
        for i in range(len(cu_seqlens_q) - 1):
            qs, ks = slice(cu_seqlens_q[i], cu_seqlens_q[i + 1]), slice(cu_seqlens_k[i], cu_seqlens_k[i + 1])
            att = torch.einsum("qhd,khd->hqk", q[qs], k[ks]).mul(softmax_scale).softmax(-1)
            outs.append(torch.einsum("hqk,khd->qhd", att, v[ks]))
        return torch.cat(outs)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fake_varlen))
    with torch.no_grad():
        out = decode(dec, io, feats)
    assert seen
    assert_close(out["pred_mask"], io["decode_synth.pred_mask"], atol=1e-4, rtol=1e-4)


def test_patch_positions():
    idx = torch.arange(24)  # a 4 x 6 patch grid, merge 2
    r, c = patch_positions(idx, 6, 2, "window")
    assert torch.equal(r * 6 + c, idx)
    r, c = patch_positions(idx, 6, 2, "merge_block")
    assert sorted((r * 6 + c).tolist()) == list(range(24))  # a bijection onto the grid
    assert list(zip(r[:8].tolist(), c[:8].tolist())) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (0, 2),
        (0, 3),
        (1, 2),
        (1, 3),
    ]


def test_merge_block_order_runs(decoder_kwargs, decoder_state, io):
    dec = make_decoder(decoder_kwargs, decoder_state, feature_order="merge_block")
    with torch.no_grad():
        out = decode(dec, io, feature_lists(io, "decode_synth"))
    assert out["pred_mask"].shape == (3, 32, 32)
    assert (out["pred_mask"][2, :, 16:] == 0).all() and (out["pred_mask"][2, :, :16] != 0).all()


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 64, "num_heads": 5}, "divisible by num_heads"),
        ({"hidden_size": 48, "num_heads": 16}, "even"),
        ({"hidden_size": 8, "num_heads": 2}, "mask upscaler"),
        ({"spatial_merge_size": 0}, "spatial_merge_size"),
        ({"attn_implementation": "flash"}, "attn_implementation"),
        ({"feature_order": "raster"}, "feature_order"),
    ],
)
def test_constructor_rejects_bad_args(decoder_kwargs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PaDTDecoder(**{**decoder_kwargs, **kwargs})


def test_vl_decode_rejects_bad_inputs(decoder, io):
    feats = feature_lists(io, "decode_synth")
    img = image_inputs(io)
    m = decoder.spatial_merge_size
    cases = [
        ({"object_vp_feats": feats[:1]}, "samples"),
        ({"object_vp_feats": [[torch.zeros(3, 7)], []]}, "feature width"),
        ({"object_vp_feats": [[torch.zeros(0, 128)], []]}, "no VRT features"),
        ({"low_res_image_embeds": img["low_res_image_embeds"][:-1]}, "low_res_embeds"),
        ({"high_res_image_embeds": img["high_res_image_embeds"][:, :32]}, "high_res_embeds"),
        ({"visual_pes": (img["visual_pes"][0][:, :8], img["visual_pes"][1])}, "visual_pe cos"),
        ({"visual_pes": img["visual_pes"][0]}, "visual_pe"),
        ({"image_grid_thws": torch.tensor([[1, 6, 8], [1, 8, 5]])}, "multiples"),
        ({"image_grid_thws": torch.tensor([[2, 6, 8], [1, 8, 4]])}, "t == 1"),
        ({"spatial_merge_size": m + 1}, "spatial_merge_size"),
        ({"image_sample_idx": [0, 5]}, "out of range"),
        ({"object_image_idx": [[0], [1]]}, "objects but"),
    ]
    for override, match in cases:
        args = {"object_vp_feats": feats, **img, "spatial_merge_size": m, **override}
        with pytest.raises(ValueError, match=match):
            vl_decode(decoder, **args)
    with pytest.raises(TypeError, match="PaDTDecoder"):
        vl_decode(torch.nn.Linear(2, 2), feats, **img, spatial_merge_size=m)
    with pytest.raises(TypeError, match="list"):
        vl_decode(decoder, torch.zeros(2, 3, 128), **img, spatial_merge_size=m)
