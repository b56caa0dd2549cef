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
from padt.testing.models import tiny_padt_config

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
from padt.testing.models import tiny_padt_config  # config only, does not import the model yet
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
import padt.model.backbones.qwen2_5_vl, padt.model.decoder.decoder, padt.model.decoder.vl_decode, padt.legacy
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
    from padt.model.backbones.qwen2_5_vl import window_index

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


# ---------------------------------------------------------------------------- per-op overhead at inference
def test_decoder_inputs_are_derived_on_first_access_and_match_the_towers_rotary(tiny_model):
    batch = build_batch(tiny_model.config, [Sample(images=[(8, 8)])])  # 2x2 windows: window order is not raster order
    seen = {}
    hook = tiny_model.model.visual.blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(pe=kwargs["position_embeddings"]), with_kwargs=True
    )
    with torch.no_grad():
        state = tiny_model.encode_image_state(batch["pixel_values"], batch["image_grid_thw"], batch["input_ids"])
    hook.remove()
    assert "pos_embeds" not in vars(state.vision), "the rotary must not be recomputed before the decoder asks for it"
    cos, sin = state.pos_embeds
    # window order: the (cos, sin) the tower itself gave its blocks, row for row
    torch.testing.assert_close(cos, seen["pe"][0].float())
    torch.testing.assert_close(sin, seen["pe"][1].float())
    assert state.pos_embeds[0] is cos, "derived once, then cached"
    assert state.high_res_embeds.shape == (64, tiny_model.config.vision_config.hidden_size)


def test_generate_hidden_states_and_state_fields_match_a_full_forward(tiny_model):
    cfg = tiny_model.config
    V = cfg.vrt_base_id
    batch = build_batch(cfg, [Sample(images=[(4, 4)]), Sample(images=[(4, 6)], text=[3])])
    prompt = batch["input_ids"].shape[1]
    with torch.no_grad():
        gen = tiny_model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                  return_dict_in_generate=True)
    seq = gen.sequences
    assert bool((seq[:, prompt:] >= V).all()), "the test needs generated VRTs fed back through the decode steps"
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(seq[:, prompt:])], 1)
    with torch.no_grad():
        full = tiny_model(input_ids=seq, attention_mask=full_mask, pixel_values=batch["pixel_values"],
                          image_grid_thw=batch["image_grid_thw"], use_cache=False)
    # the hidden state that predicted token t is the full forward's state at position prompt - 1 + t
    torch.testing.assert_close(gen.vrt_hidden_states, full.last_hidden_state[:, prompt - 1:-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gen.past_logit_mask, full.past_logit_mask)
    for got, want in zip(gen.past_visual_pe, full.past_visual_pe):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(gen.past_high_res_image_embeds, full.past_high_res_image_embeds)
    assert not gen.padt_state.generating


def test_generate_checks_vrt_ids_given_in_the_prompt(tiny_model):
    cfg = tiny_model.config
    two = build_batch(cfg, [Sample(images=[(4, 4)], tail=[("vrt", 0, 1)]), Sample(images=[(4, 4)])])
    two["input_ids"][0, -1] = cfg.vrt_base_id + 5  # a cell of row 1's image
    with torch.no_grad(), pytest.raises(ValueError, match="may only refer to its own images"):
        tiny_model.generate(**two, max_new_tokens=2, do_sample=False)


def _profiled_ops(model, batch, new_tokens):
    """(aten op events of the prefill, per decode token, sequences) of one greedy generate."""
    import time

    from torch.profiler import ProfilerActivity, profile

    ends = []
    hook = model.register_forward_hook(lambda *args: ends.append(time.time_ns()))
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(**batch, **kw)  # warm-up
        ends.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            seq = model.generate(**batch, **kw)
    hook.remove()
    counts = [0, 0]
    for event in prof.profiler.kineto_results.events():
        if event.name() != "[memory]":
            counts[event.start_ns() >= ends[0]] += 1
    return counts[0], counts[1] / (new_tokens - 1), seq


@pytest.mark.parametrize("text_steps", [True, False], ids=["text-steps", "vrt-steps"])
def test_op_overhead_over_vanilla_qwen_stays_small(text_steps):
    """PaDT adds few aten ops to vanilla Qwen2.5-VL (same base weights): per decode step one id scan, the prototype
    logits and their concatenation (VRT steps also embed the prototype); per prefill the prototypes and the image
    state, but no rotary / window-index recomputation (only the decoder needs those). Bounds: measured + margin."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    model = make_tiny_model()
    if text_steps:  # prototypes 0: every VRT logit is 0 and greedy decoding picks the best text token (logit > 0)
        torch.nn.init.zeros_(model.vis_norm.weight)
        torch.nn.init.zeros_(model.vis_norm.bias)
    cfg = model.config.to_dict()
    for k in ("vl_decoder", "use_visual_prototype_projection", "visual_prototype_rank", "vrt_feature_order",
              "decoder_attn_implementation", "mask_unused_token_rows", "num_tokenizer_tokens"):
        cfg.pop(k)
    vanilla = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(cfg)).eval()
    vanilla.load_state_dict(model.state_dict(), strict=False)
    batch = build_batch(model.config, [Sample(images=[(8, 8)], text=[1, 2, 3, 4, 5, 6])])
    batch["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
    padt_prefill, padt_step, seq = _profiled_ops(model, batch, 6)
    vanilla_prefill, vanilla_step, _ = _profiled_ops(vanilla, batch, 6)
    new = seq[:, batch["input_ids"].shape[1]:]
    assert bool((new < model.config.vrt_base_id).all() if text_steps else (new >= model.config.vrt_base_id).all())
    # measured (torch 2.13, transformers 5.23): +12 per text step, +33 per VRT step, +55 per prefill; before the
    # per-op work: +24, +101 and +371
    extra_step, extra_prefill = padt_step - vanilla_step, padt_prefill - vanilla_prefill
    assert extra_step <= (16 if text_steps else 40), f"{extra_step:.1f} extra aten ops per decode step"
    assert extra_prefill <= 80, f"{extra_prefill} extra aten ops in the prefill"


def test_embed_with_prototypes_reads_each_table_only_where_it_applies():
    from padt.model.prototypes import embed_with_prototypes

    torch.manual_seed(0)
    V, H = 10, 4
    table = torch.nn.Embedding(V, H)
    prototypes = torch.randn(3, H, requires_grad=True)
    ids = torch.tensor([[1, V + 2, 9, V + 0], [V + 1, 0, 3, 4]])
    out = embed_with_prototypes(ids, table, prototypes, V)
    want = torch.stack([torch.stack([prototypes[i - V] if i >= V else table.weight[i] for i in row]) for row in ids])
    torch.testing.assert_close(out, want)
    out.sum().backward()
    # each prototype's gradient counts only its own VRT positions (text positions read prototype 0 but are not kept)
    torch.testing.assert_close(prototypes.grad, torch.ones(3, 1).expand(3, H))
    assert table.weight.grad[9].eq(1).all(), "text id 9 is used once; VRT positions (clamped to row 9) add nothing"


def _uniform_image(batch: dict, rows: slice) -> dict:
    """Overwrite the patches `rows` of `batch["pixel_values"]` with one colour per channel (a near-uniform image)."""
    pv, per_channel = batch["pixel_values"], batch["pixel_values"].shape[1] // 3
    for ch, value in enumerate((0.5, -0.3, 0.1)):
        pv[rows, ch * per_channel:(ch + 1) * per_channel] = value
    return batch


def test_uniform_image_alone_and_in_a_batch_differs_only_by_float_noise_and_ties(tiny_model):
    """A one-colour image alone vs in a left-padded batch of two: same logits to float tolerance; VRT flips are ties.

    Every cell of a one-colour image gets the same features (attention over identical rows returns that row, whatever
    the rotary), so the image's VRT logits tie up to rounding. The batch changes the rounding only: left-padding
    keeps positions (Qwen's rope index follows the attention mask) and the per-row logit mask keeps each row to its
    own prototypes. So an argmax may flip between tied VRTs, and nowhere else.
    """
    cfg = tiny_model.config
    V, tol = cfg.vrt_base_id, 1e-4
    a = Sample(images=[(4, 4)], text=[1, 2], tail=[7, ("vrt", 0, 1), ("vrt", 0, 3), 8, ("vrt", 0, 0), 9])
    b = Sample(images=[(4, 6)], text=[1, 2, 3, 4, 5, 6, 9, 9], tail=[3, ("vrt", 0, 2), 4], seed=1)
    alone_batch = _uniform_image(build_batch(cfg, [a]), slice(0, 16))
    both_batch = _uniform_image(build_batch(cfg, [a, b]), slice(0, 16))
    assert (both_batch["attention_mask"][0] == 0).sum() > 0, "row 0 must be left-padded in the batch"
    alone, both = _forward(tiny_model, alone_batch), _forward(tiny_model, both_batch)
    n = alone.logits.shape[1]
    la, lb = alone.logits[0], both.logits[0, -n:]
    own = slice(V, V + 4)  # the image's 4 cells
    # logits: the same to fp32 noise (relative, the VRT logits are ~65 here), other row's VRTs masked
    torch.testing.assert_close(lb[:, :V], la[:, :V], atol=tol, rtol=1e-5)
    torch.testing.assert_close(lb[:, own], la[:, own], atol=tol, rtol=1e-5)
    assert torch.isinf(lb[:, V + 4:]).all()
    torch.testing.assert_close(both.padt_state.prototypes[:4], alone.padt_state.prototypes, atol=1e-5, rtol=1e-5)
    # the degenerate image: its VRT logits are tied at every position
    assert (la[:, own].max(-1).values - la[:, own].min(-1).values < tol).all()
    # greedy choices (teacher-forced): a flip only where the alone logits tie the two choices
    pick_a, pick_b = la.argmax(-1), lb.argmax(-1)
    flips = (pick_a != pick_b).nonzero().flatten()
    assert (la.max(-1).values[flips] - la[flips, pick_b[flips]] < tol).all(), "a flip that is not a near-tie"
    assert (pick_a[flips] >= V).all() and (pick_b[flips] >= V).all(), "only tied VRTs may flip"

    # free-running greedy generate: equal tokens until the first near-tie flip (then the continuations may diverge)
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True,
          "output_logits": True}
    with torch.no_grad():
        ga = tiny_model.generate(**alone_batch, **kw)
        gb = tiny_model.generate(**both_batch, **kw)
    prompt_a, prompt_b = alone_batch["input_ids"].shape[1], both_batch["input_ids"].shape[1]
    new_a, new_b = ga.sequences[0, prompt_a:], gb.sequences[0, prompt_b:]
    assert (new_a >= V).any(), "the test needs generated VRTs"
    for t in range(len(new_a)):
        step_a, step_b = ga.logits[t][0], gb.logits[t][0]
        torch.testing.assert_close(step_b[:V], step_a[:V], atol=tol, rtol=1e-5)
        if new_a[t] != new_b[t]:
            assert step_a.max() - step_a[new_b[t]] < tol, f"step {t}: a flip that is not a near-tie"
            break
