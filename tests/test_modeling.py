"""Tiny random PaDT models built in code: batching, caching, text-only and multi-image rows, ties, save/load, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file, save_file
from tiny_batch import Sample, build_batch

from padt import PaDTForConditionalGeneration
from padt.tiny_model import tiny_padt_config

VRT_TAIL = [7, ("vrt", 0, 1), ("vrt", 0, 3), 8, ("vrt", 0, 0), 9]


def _forward(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, use_cache=False, **kw)


def test_batch_of_two_image_sizes_equals_each_alone(tiny_model):
    cfg = tiny_model.config
    V = cfg.vrt_base_id
    a = Sample(images=[(4, 6)], text=[1, 2, 3, 4, 5, 6], tail=VRT_TAIL)
    b = Sample(images=[(6, 4)], text=[9], tail=[("vrt", 0, 5), 3, ("vrt", 0, 2)], seed=1)
    both = _forward(tiny_model, build_batch(cfg, [a, b]))
    for row, (sample, own) in enumerate([(a, slice(V, V + 6)), (b, slice(V + 6, V + 12))]):
        alone = _forward(tiny_model, build_batch(cfg, [sample]))
        n = alone.logits.shape[1]
        got = both.logits[row, -n:]
        torch.testing.assert_close(got[:, :V], alone.logits[0, :, :V], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[:, own], alone.logits[0, :, V:], atol=1e-5, rtol=1e-4)
        other = torch.ones(got.shape[-1], dtype=torch.bool)
        other[:V], other[own] = False, False
        assert torch.isinf(got[:, other]).all(), "a row must not see the other row's prototypes"
    assert torch.equal(both.past_logit_mask[:, V:].sum(1), torch.tensor([6, 6]))


def test_kv_cache_decode_equals_full_forward(tiny_model):
    cfg = tiny_model.config
    batch = build_batch(cfg, [Sample(images=[(4, 4)], tail=VRT_TAIL), Sample(images=[(4, 6)], text=[3], tail=VRT_TAIL)])
    full = _forward(tiny_model, batch)
    ids, mask, prompt = batch["input_ids"], batch["attention_mask"], batch["input_ids"].shape[1] - len(VRT_TAIL)
    with torch.no_grad():
        out = tiny_model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], pixel_values=batch["pixel_values"],
                         image_grid_thw=batch["image_grid_thw"], use_cache=True)
        state, cache, steps = out.padt_state, out.past_key_values, [out.logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            out = tiny_model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                             padt_state=state, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full.logits[:, prompt - 1:], atol=1e-5, rtol=1e-4)


def test_text_only_forward_and_generate(tiny_model):
    cfg = tiny_model.config
    batch = build_batch(cfg, [Sample(text=[1, 2, 3, 4], tail=[]), Sample(text=[5, 6], tail=[])])
    out = _forward(tiny_model, batch)
    assert out.logits.shape == (2, 4, cfg.vrt_base_id) and out.past_image_embeds is None
    with torch.no_grad():
        gen = tiny_model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                  return_dict_in_generate=True)
    assert gen.sequences.shape == (2, 8)
    assert bool((gen.sequences[:, 4:] < cfg.vrt_base_id).all()), "no VRT ids without images"


def test_two_images_in_one_sample_and_a_row_without_image(tiny_model):
    cfg = tiny_model.config
    V = cfg.vrt_base_id
    two = Sample(images=[(4, 4), (4, 6)], tail=[("vrt", 0, 2), 7, ("vrt", 1, 5), 8])
    none = Sample(text=[1, 2, 3, 4, 5])
    one = Sample(images=[(6, 4)], tail=[("vrt", 0, 1)], seed=2)
    both = _forward(tiny_model, build_batch(cfg, [two, none, one]))
    mask = both.past_logit_mask[:, V:]
    assert mask.shape == (3, 4 + 6 + 6)
    assert mask[0, :10].all() and not mask[0, 10:].any()
    assert not mask[1].any()
    assert mask[2, 10:].all() and not mask[2, :10].any()
    for row, sample in ((0, two), (1, none)):
        alone = _forward(tiny_model, build_batch(cfg, [sample]))
        n = alone.logits.shape[1]
        torch.testing.assert_close(both.logits[row, -n:, :V], alone.logits[0, :, :V], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        gen = tiny_model.generate(**build_batch(cfg, [two, none]), max_new_tokens=3, do_sample=False,
                                  return_dict_in_generate=True)
    assert gen.vrt_hidden_states.shape[:2] == (2, gen.sequences.shape[1] - build_batch(cfg, [two, none])["input_ids"].shape[1])


def test_sampling_and_num_return_sequences(tiny_model):
    cfg = tiny_model.config
    batch = build_batch(cfg, [Sample(images=[(4, 4)]), Sample(images=[(4, 6)])])
    torch.manual_seed(0)
    with torch.no_grad():
        gen = tiny_model.generate(**batch, max_new_tokens=5, do_sample=True, top_k=0, temperature=5.0,
                                  num_return_sequences=2, return_dict_in_generate=True)
    assert gen.sequences.shape[0] == 4
    vrt = gen.sequences[:, batch["input_ids"].shape[1]:] - cfg.vrt_base_id
    owner = torch.tensor([0, 0, 1, 1])[:, None].expand_as(vrt)
    # emitted VRT ids stay inside each row's own image (cells 0-3 image 0, 4-9 image 1)
    own = torch.where(owner == 0, (vrt >= 0) & (vrt < 4), (vrt >= 4) & (vrt < 10))
    assert bool(torch.where(vrt >= 0, own, torch.ones_like(own)).all())


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_embeddings(tie, tmp_path):
    model = make_tiny_model(tie_word_embeddings=tie)
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert (emb.data_ptr() == head.data_ptr()) is tie
    batch = build_batch(model.config, [Sample(images=[(4, 4)], tail=VRT_TAIL)])
    out = _forward(model, batch)
    V = model.config.vrt_base_id
    torch.testing.assert_close(out.logits[..., :V], out.last_hidden_state @ head.T, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    again = PaDTForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert (again.get_input_embeddings().weight.data_ptr() == again.lm_head.weight.data_ptr()) is tie
    torch.testing.assert_close(_forward(again, batch).logits, out.logits)


def test_save_load_round_trip_new_and_legacy_keys(tiny_model, tmp_path):
    batch = build_batch(tiny_model.config, [Sample(images=[(4, 6)], tail=VRT_TAIL)])
    ref = _forward(tiny_model, batch).logits
    new = tmp_path / "new"
    tiny_model.save_pretrained(new)
    cfg = json.loads((new / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["vl_decoder"]["hidden_size"] == 32
    keys = load_file(str(new / "model.safetensors")).keys()
    assert "vl_decoder.vp_embedding.weight" in keys and "vis_proj.0.weight" in keys
    torch.testing.assert_close(_forward(PaDTForConditionalGeneration.from_pretrained(new), batch).logits, ref)

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((new / "config.json").read_text())
    sd = load_file(str(new / "model.safetensors"))
    renamed = {}
    for k, v in sd.items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        renamed[k] = v
    assert "model.embed_tokens.weight" in renamed and "visual.merger.ln_q.weight" in renamed
    save_file(renamed, str(legacy / "model.safetensors"), metadata={"format": "pt"})
    model, info = PaDTForConditionalGeneration.from_pretrained(legacy, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_forward(model.eval(), batch).logits, ref)


def test_base_qwen_checkpoint_initialises_padt_modules(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = tiny_padt_config().to_dict()
    for k in ("vl_decoder", "use_visual_prototype_projection", "visual_prototype_rank", "vrt_feature_order",
              "decoder_attn_implementation", "mask_unused_token_rows", "num_tokenizer_tokens"):
        cfg.pop(k)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(cfg)).save_pretrained(tmp_path)
    model = PaDTForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.count_nonzero(model.vis_norm.weight) == 0 and torch.count_nonzero(model.vis_norm.bias) == 0
    assert 0.01 < model.vl_decoder.vp_embedding.weight.std().item() < 0.04  # N(0, 0.02)
    batch = build_batch(model.config, [Sample(images=[(4, 4)])])
    assert torch.count_nonzero(_forward(model, batch).past_image_embeds) == 0, "prototypes start at exactly 0"


def test_checkpoint_missing_padt_weights_names_them(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith("vis_proj.")}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 2 PaDT weights: vis_proj\.0\.weight, vis_proj\.1\.weight"):
        PaDTForConditionalGeneration.from_pretrained(tmp_path)
    model = PaDTForConditionalGeneration.from_pretrained(tmp_path, allow_missing_padt_weights=True)
    assert model.vis_proj[0].weight.shape == (64, 64)


def test_bad_inputs_raise_clear_errors(tiny_model):
    cfg = tiny_model.config
    V = cfg.vrt_base_id
    batch = build_batch(cfg, [Sample(images=[(4, 4)])])
    short = dict(batch, input_ids=batch["input_ids"].clone())
    short["input_ids"][0, short["input_ids"][0].tolist().index(cfg.image_token_id)] = 1
    with pytest.raises(ValueError, match="image-token count mismatch"):
        _forward(tiny_model, short)
    far = dict(batch, input_ids=torch.cat([batch["input_ids"], torch.tensor([[V + 4]])], 1),
               attention_mask=torch.cat([batch["attention_mask"], torch.tensor([[1]])], 1))
    with pytest.raises(ValueError, match="outside the batch's 4 image prototypes"):
        _forward(tiny_model, far)
    two = build_batch(cfg, [Sample(images=[(4, 4)], tail=[("vrt", 0, 1)]), Sample(images=[(4, 4)])])
    two["input_ids"][0, -1] = V + 5  # a cell of row 1's image
    with pytest.raises(ValueError, match="may only refer to its own images"):
        _forward(tiny_model, two)
    small = build_batch(cfg, [Sample(images=[(4, 4)])])
    small["image_grid_thw"] = torch.tensor([[1, 2, 8]])
    small["pixel_values"] = small["pixel_values"]
    ok = _forward(tiny_model, small)  # 2x8 patches = 1x4 cells is fine
    assert ok.past_image_embeds.shape[0] == 4
    small["image_grid_thw"] = torch.tensor([[1, 16, 1]])
    with pytest.raises(ValueError, match="at least 28x28 px"):
        _forward(tiny_model, small)
    with pytest.raises(ValueError, match="images only"):
        tiny_model(**batch, pixel_values_videos=batch["pixel_values"])


def test_incompatible_decoder_config_raises():
    with pytest.raises(ValueError, match=r"vl_decoder.hidden_size=48 must equal vision_config.hidden_size=32"):
        tiny_padt_config(vl_decoder={"hidden_size": 48})
    with pytest.raises(ValueError, match=r"vl_decoder.num_heads=4 must equal vision_config.num_heads=2"):
        tiny_padt_config(vl_decoder={"num_heads": 4})
    with pytest.raises(ValueError, match="vrt_feature_order"):
        tiny_padt_config(vrt_feature_order="zigzag")


def test_import_padt_leaves_vanilla_qwen_unchanged_and_imports_no_optional_stacks():
    code = r"""
import sys, torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as M
from padt.tiny_model import tiny_padt_config  # config only, does not import the model yet
cfg = tiny_padt_config().to_dict()
for k in ("vl_decoder", "use_visual_prototype_projection"): cfg.pop(k)
from transformers import Qwen2_5_VLConfig
torch.manual_seed(0)
m = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(cfg)).eval()
ids = torch.tensor([[1, 2, 3, cfg["vision_start_token_id"]] + [cfg["image_token_id"]] * 4 + [cfg["vision_end_token_id"], 5]])
kw = dict(input_ids=ids, pixel_values=torch.randn(16, 1176), image_grid_thw=torch.tensor([[1, 4, 4]]),
          mm_token_type_ids=(ids == cfg["image_token_id"]).int())
fwd = (M.Qwen2_5_VisionTransformerPretrainedModel.forward, M.Qwen2_5_VLModel.forward,
       M.Qwen2_5_VLForConditionalGeneration.forward, M.Qwen2_5_VLForConditionalGeneration.generate)
with torch.no_grad():
    before = m(**kw).logits
import padt
from padt import PaDTForConditionalGeneration, PaDTDecoder
import padt.modeling, padt.decoder, padt.vl_decode
after_fwd = (M.Qwen2_5_VisionTransformerPretrainedModel.forward, M.Qwen2_5_VLModel.forward,
             M.Qwen2_5_VLForConditionalGeneration.forward, M.Qwen2_5_VLForConditionalGeneration.generate)
with torch.no_grad():
    after = m(**kw).logits
    vis = m.model.visual(kw["pixel_values"], grid_thw=kw["image_grid_thw"])
assert all(a is b for a, b in zip(fwd, after_fwd)), "a Qwen2.5-VL method was replaced"
assert torch.equal(before, after)
assert type(vis).__name__ == "BaseModelOutputWithPooling"
bad = [name for name in ("deepspeed", "flash_attn") if name in sys.modules]
assert not bad, bad
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_merge_block_feature_order_groups_rows_by_cell():
    window = make_tiny_model()
    block = make_tiny_model(vrt_feature_order="merge_block")
    batch = build_batch(window.config, [Sample(images=[(8, 8)])])  # 4x4 cells, 2x2 windows: order differs
    a, b = _forward(window, batch).padt_state, _forward(block, batch).padt_state
    assert not torch.equal(a.high_res_embeds, b.high_res_embeds)
    # same rows, other order; in merge_block order rows 4c..4c+3 belong to cell c, like the prototypes
    assert torch.allclose(a.high_res_embeds.sort(0).values, b.high_res_embeds.sort(0).values)
    from padt.vision import window_index

    idx = window_index(window.model.visual, batch["image_grid_thw"])
    torch.testing.assert_close(a.high_res_embeds.reshape(16, 4, -1)[torch.argsort(idx)], b.high_res_embeds.reshape(16, 4, -1))
    feats = [[torch.randn(3, 64)]]
    out = block.vl_decode(feats, b.prototypes, b.high_res_embeds, batch["image_grid_thw"], b.pos_embeds)
    assert out["pred_mask"].shape == (1, 32, 32)


def test_mask_unused_token_rows():
    model = make_tiny_model(mask_unused_token_rows=True, num_tokenizer_tokens=310)
    out = _forward(model, build_batch(model.config, [Sample(images=[(4, 4)])]))
    assert torch.isinf(out.logits[..., 310:320]).all() and torch.isfinite(out.logits[..., :310]).all()
    assert torch.isfinite(out.logits[..., 320:]).all()
    with pytest.raises(ValueError, match="num_tokenizer_tokens"):
        tiny_padt_config(mask_unused_token_rows=True)
