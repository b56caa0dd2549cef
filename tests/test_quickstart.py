"""The authors' README quick-start, call for call, on a tiny local checkpoint; and our one-call predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from padt.processing import torchvision_available
from padt.testing.models import tiny_padt_config_for_tokenizer
from padt.testing.tokenizer import build_tiny_processor, build_tiny_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny PaDT model + processor whose text logits are 0, so that greedy decoding emits VRTs."""
    from padt import PaDTForConditionalGeneration

    path = tmp_path_factory.mktemp("ckpt")
    tok = build_tiny_tokenizer()
    processor = build_tiny_processor(tok)
    torch.manual_seed(0)
    model = PaDTForConditionalGeneration(tiny_padt_config_for_tokenizer(tok))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.vis_norm.weight.fill_(1.0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    image = path / "image.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(image)
    return path, image


def test_authors_quickstart_runs_unchanged(checkpoint):
    path, image_path = checkpoint
    TEST_IMG_PATH, MODEL_PATH = str(image_path), str(path)

    # ---- the quick-start; the two imports below are the only substitutions, and only without torchvision ----
    from transformers import AutoProcessor

    from padt import PaDTForConditionalGeneration, VisonTextProcessingClass, parseVRTintoCompletion

    if torchvision_available():
        from qwen_vl_utils import process_vision_info
    else:
        from padt.processing import load_processor as _load
        from padt.processing import process_vision_info

        AutoProcessor = type("AutoProcessor", (), {"from_pretrained": staticmethod(_load)})

    model = PaDTForConditionalGeneration.from_pretrained(MODEL_PATH, torch_dtype=torch.bfloat16,
                                                         device_map={"": "cpu"})
    processor = AutoProcessor.from_pretrained(MODEL_PATH)
    processor = VisonTextProcessingClass(processor, model.config.vision_config.spatial_merge_size)
    processor.prepare(model.model.embed_tokens.weight.shape[0])
    prompt = 'Please carefully check the image and detect the object this sentence describes: "the thing".'
    message = [{"role": "user", "content": [{"type": "image", "image": TEST_IMG_PATH}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    image_inputs, video_inputs = process_vision_info(message)
    prompt_inputs = processor(text=[text], images=image_inputs, padding=True, padding_side="left",
                              return_tensors="pt", add_special_tokens=False).to("cpu")
    with torch.inference_mode():
        result = model.generate(**prompt_inputs, use_cache=True, max_new_tokens=6, do_sample=False,
                                output_hidden_states=True, return_dict_in_generate=True)
        prompt_length = prompt_inputs["input_ids"].size(1)
        completion_ids = result["sequences"][:, prompt_length:]
        completions, feats, labels, vrts, vrts_feats = parseVRTintoCompletion(
            processor, completion_ids, result["hidden_states"], torch.Tensor([False]))
        decoded = model.vl_decode(feats, result.past_image_embeds, result.past_high_res_image_embeds,
                                  prompt_inputs["image_grid_thw"], result.past_visual_pe)
    # ---- checks ----
    n_obj = sum(len(f) for f in feats)
    assert n_obj >= 1, completions
    assert completions[0].count("<|VRT_") == int((completion_ids >= model.config.vrt_base_id).sum())
    assert decoded["pred_boxes"].shape == (n_obj, 4) and decoded["pred_score"].shape == (n_obj, 1)
    assert ((decoded["pred_boxes"] >= 0) & (decoded["pred_boxes"] <= 1)).all()
    # the cheap per-step features padt records equal the authors' per-layer hidden states at the VRT steps
    steps = (completion_ids[0] >= model.config.vrt_base_id).nonzero().flatten()
    torch.testing.assert_close(torch.cat(feats[0]).float(), result.vrt_hidden_states[0, steps].float())


def test_predictor_one_call(checkpoint):
    from padt import PaDTPredictor

    path, image_path = checkpoint
    predictor = PaDTPredictor.from_pretrained(path, device="cpu", max_new_tokens=5)
    [pred] = predictor.predict(str(image_path), "Please describe this image.")
    assert pred.image_size == (130, 90)
    assert pred.text.count("<|VRT_") == sum(len(o.vrt_ids) for o in pred.objects) >= 1
    n_cells = pred.grid_thw[1] * pred.grid_thw[2] // 4
    for obj in pred.objects:
        x1, y1, x2, y2 = obj.box_xyxy
        assert 0 <= x1 <= x2 <= 130 and 0 <= y1 <= y2 <= 90
        assert obj.mask.shape == (90, 130) and obj.mask.dtype == bool
        assert 0 < obj.score < 1 and all(0 <= k < n_cells for k in obj.vrt_ids)
    with pytest.raises(ValueError, match="one image per prompt"):
        predictor.predict([str(image_path)] * 2, ["a"])
