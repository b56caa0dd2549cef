"""Our model reproduces the authors' code, captured as numbers in tests/fixtures/oracle_ref (README there).

Tolerances are the README's: logits/hidden states atol=rtol=1e-4 with identical -inf pattern; prototypes and high-res
features atol 1e-5 rtol 1e-4; rotary atol 1e-6; decoder boxes/scores atol 1e-5 rtol 1e-4, masks 1e-4; exact for masks,
positions, deltas, valid sizes, sample indices and generated sequences.
"""

from __future__ import annotations

import torch
from conftest import ORACLE_DIR, close

from padt import PaDTForConditionalGeneration


def test_loads_unchanged_with_legacy_keys():
    from safetensors.torch import load_file

    model, info = PaDTForConditionalGeneration.from_pretrained(
        str(ORACLE_DIR / "model"), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    raw = load_file(str(ORACLE_DIR / "model" / "model.safetensors"))
    ours = model.state_dict()
    renamed = {"model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
               "visual.blocks.0.attn.qkv.weight": "model.visual.blocks.0.attn.qkv.weight",
               "vis_norm.weight": "vis_norm.weight", "vl_decoder.vp_embedding.weight": "vl_decoder.vp_embedding.weight",
               "lm_head.weight": "lm_head.weight"}
    for legacy, new in renamed.items():
        assert torch.equal(raw[legacy], ours[new]), legacy
    assert model.config.vrt_base_id == 512 and model.config.vl_decoder["hidden_size"] == 64


def test_forward_logits_and_hidden_states(oracle_forward, oracle_io):
    valid = oracle_io["inputs.attention_mask"].bool()
    close(oracle_forward.logits[valid], oracle_io["forward.logits"][valid], 1e-4, 1e-4)
    for i in range(3):
        close(oracle_forward.hidden_states[i][valid], oracle_io[f"forward.hidden_states.{i}"][valid], 1e-4, 1e-4)
    # the final-norm state we always return equals the last hidden state of the authors' list
    close(oracle_forward.last_hidden_state[valid], oracle_io["forward.hidden_states.2"][valid], 1e-4, 1e-4)


def test_forward_image_state(oracle_forward, oracle_io):
    assert torch.equal(oracle_forward.past_logit_mask, oracle_io["forward.logit_mask"])
    close(oracle_forward.past_image_embeds, oracle_io["forward.past_image_embeds"], 1e-5, 1e-4)
    close(oracle_forward.past_high_res_image_embeds, oracle_io["forward.past_high_res_image_embeds"], 1e-5, 1e-4)
    cos, sin = oracle_forward.past_visual_pe
    close(cos, oracle_io["forward.visual_pe_cos"], 1e-6, 0)
    close(sin, oracle_io["forward.visual_pe_sin"], 1e-6, 0)
    assert torch.equal(oracle_forward.rope_deltas, oracle_io["forward.rope_deltas"])


def test_position_ids_equal_authors(oracle_model, oracle_io):
    ids, mask = oracle_io["inputs.input_ids"], oracle_io["inputs.attention_mask"]
    pos, _ = oracle_model.model.get_rope_index(
        ids, mm_token_type_ids=oracle_model.mm_token_type_ids_from(ids),
        image_grid_thw=oracle_io["inputs.image_grid_thw"], attention_mask=mask,
    )
    valid = mask.bool()
    assert torch.equal(pos[:, valid], oracle_io["forward.position_ids"][:, valid])


def _decode_feats(io: dict, name: str, num_samples: int = 2) -> list[list[torch.Tensor]]:
    feats = []
    for s in range(num_samples):
        objs, o = [], 0
        while f"{name}.feats.s{s}.o{o}" in io:
            objs.append(io[f"{name}.feats.s{s}.o{o}"])
            o += 1
        feats.append(objs)
    return feats


def test_vl_decode_all_four_cases(oracle_model, oracle_io):
    io = oracle_io
    pe = (io["forward.visual_pe_cos"], io["forward.visual_pe_sin"])
    for name in ("decode_hidden", "decode_proto", "decode_synth", "decode_synth_empty0"):
        with torch.no_grad():
            out = oracle_model.vl_decode(
                _decode_feats(io, name), io["forward.past_image_embeds"], io["forward.past_high_res_image_embeds"],
                io["inputs.image_grid_thw"], pe,
            )
        close(out["pred_boxes"], io[f"{name}.pred_boxes"], 1e-5, 1e-4)
        close(out["pred_score"], io[f"{name}.pred_score"], 1e-5, 1e-4)
        close(out["pred_mask"], io[f"{name}.pred_mask"], 1e-4, 1e-4)
        hs, ws = out["pred_mask_valid_hw"]
        assert torch.equal(hs.cpu(), io[f"{name}.pred_mask_valid_h"]) and torch.equal(ws.cpu(), io[f"{name}.pred_mask_valid_w"])
        assert list(out["sample_idx"]) == io[f"{name}.sample_idx"].tolist()


def test_vl_decode_through_forward_is_main_false(oracle_model, oracle_io):
    io = oracle_io
    pe = (io["forward.visual_pe_cos"], io["forward.visual_pe_sin"])
    args = (_decode_feats(io, "decode_hidden"), io["forward.past_image_embeds"],
            io["forward.past_high_res_image_embeds"], io["inputs.image_grid_thw"], pe)
    with torch.no_grad():
        out = oracle_model(*args, is_main=False)
    close(out["pred_boxes"], io["decode_hidden.pred_boxes"], 1e-5, 1e-4)


def test_greedy_generate_matches(oracle_model, oracle_io):
    io = oracle_io
    with torch.no_grad():
        out = oracle_model.generate(
            input_ids=io["generate.input_ids"], attention_mask=io["generate.attention_mask"],
            pixel_values=io["inputs.pixel_values"], image_grid_thw=io["inputs.image_grid_thw"],
            max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
        )
    assert torch.equal(out.sequences, io["generate.sequences"])
    close(torch.stack(out.logits, 0), io["generate.step_logits"], 1e-4, 1e-4)
    close(out.past_image_embeds, io["generate.past_image_embeds"], 1e-5, 1e-4)
    assert out.vrt_hidden_states.shape == (2, 8, 128)


def test_kv_cache_decode_with_authors_past_state(oracle_model, oracle_io):
    """Teacher-forced decode: prefill the prompt, then one token per call with the four past_* tensors."""
    io = oracle_io
    ids, mask, prompt = io["inputs.input_ids"], io["inputs.attention_mask"], 64
    with torch.no_grad():
        out = oracle_model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt],
                           pixel_values=io["inputs.pixel_values"], image_grid_thw=io["inputs.image_grid_thw"],
                           use_cache=True)
        past = {k: getattr(out, k) for k in ("past_image_embeds", "past_logit_mask", "past_high_res_image_embeds",
                                             "past_visual_pe")}
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(prompt, ids.shape[1] - 1):
            out = oracle_model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                               use_cache=True, **past)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    got = torch.stack(steps, 1)
    keep = io["inputs.completion_mask"].bool()
    close(got[keep], io["incremental.step_logits"][keep], 1e-4, 1e-4)
