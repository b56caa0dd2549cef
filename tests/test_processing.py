"""Processors: tiny tokenizer/processor, load/save without torchvision, VRT text <-> ids, both wrappers, images."""

import base64
import json
import re
import time
from io import BytesIO
from pathlib import Path

import pytest
import torch
from PIL import Image

from padt.legacy import parseVRTintoCompletion
from padt.processing import (
    ImageOnlyQwen2_5_VLProcessor,
    PaDTProcessor,
    VisonTextProcessingClass,
    check_vrt_base,
    fetch_image,
    load_image,
    load_processor,
    process_vision_info,
    torchvision_available,
)
from padt.testing.tokenizer import QWEN_ADDED_TOKENS, build_tiny_processor, build_tiny_tokenizer

ORACLE = Path(__file__).parent / "fixtures" / "oracle_ref"
V = 1024  # embedding rows of a tiny model around the tiny tokenizer (1022 entries)


@pytest.fixture(scope="module")
def tiny_processor():
    return build_tiny_processor()


@pytest.fixture(scope="module")
def oracle():
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = safetensors.load_file(str(ORACLE / "io.safetensors"))
    meta = json.loads((ORACLE / "io.json").read_text())
    return tensors, meta


def _image(w=100, h=60, color=(200, 20, 20)):
    return Image.new("RGB", (w, h), color)


# ----------------------------------------------------------------------------- tiny tokenizer / processor
def test_tiny_tokenizer_is_deterministic_and_qwen_like():
    t0 = time.perf_counter()
    tok = build_tiny_tokenizer(vocab_size=700, seed=3)
    assert time.perf_counter() - t0 < 2.0
    tok2 = build_tiny_tokenizer(vocab_size=700, seed=3)
    assert tok.get_vocab() == tok2.get_vocab()
    assert tok is not tok2
    assert len(tok) == 700 + len(QWEN_ADDED_TOKENS)
    names = [t for t, _ in QWEN_ADDED_TOKENS]
    assert tok.convert_tokens_to_ids(names) == list(range(700, 700 + len(names)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    text = 'There are 2 "person" (<|box_start|>x<|box_end|>) in this image, 漢字 é.<|im_end|>'
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[-1] == tok.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError):
        build_tiny_tokenizer(vocab_size=100)


def test_tiny_processor_processes_an_image(tiny_processor):
    if not torchvision_available():
        assert isinstance(tiny_processor, ImageOnlyQwen2_5_VLProcessor)
    text = tiny_processor.apply_chat_template(PaDTProcessor.build_messages(_image(), "find it"), tokenize=False,
                                              add_generation_prompt=True)
    out = tiny_processor(text=[text], images=[_image()], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 8]]  # 100x60 -> 112x56 px -> 4x8 patches
    assert out["pixel_values"].shape == (32, 3 * 2 * 14 * 14)
    n_pad = int((out["input_ids"] == tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert n_pad == 8 == int(out["mm_token_type_ids"].sum())


def test_processor_save_load_round_trip(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert cfg["processor_class"] == "Qwen2_5_VLProcessor"  # loadable as the real class where torchvision exists
    assert cfg["video_processor"]["merge_size"] == 2
    loaded = load_processor(tmp_path)
    assert type(loaded).__name__ in ("ImageOnlyQwen2_5_VLProcessor", "Qwen2_5_VLProcessor")
    assert loaded.tokenizer.get_vocab() == tiny_processor.tokenizer.get_vocab()
    msgs = PaDTProcessor.build_messages(_image(), 'Find "red box".')
    texts = [p.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) for p in (tiny_processor, loaded)]
    assert texts[0] == texts[1]
    a = tiny_processor(text=texts[:1], images=[_image()], return_tensors="pt")
    b = loaded(text=texts[1:], images=[_image()], return_tensors="pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="not a directory"):
        load_processor(tmp_path / "missing")


def test_load_oracle_processor_reproduces_oracle_prompt(oracle):
    tensors, meta = oracle
    proc = load_processor(ORACLE / "processor")
    users = [re.search(r"<\|vision_end\|>(.*)<\|im_end\|>\n<\|im_start\|>assistant", p, re.DOTALL).group(1)
             for p in meta["strings"]["prompt_text"]]
    images = [Image.open(ORACLE / "images" / f"img{i}.png") for i in range(2)]
    out = PaDTProcessor(proc, 512)(images, users)
    assert torch.equal(out["input_ids"], tensors["inputs.input_ids"][:, :64])
    assert torch.equal(out["attention_mask"], tensors["inputs.attention_mask"][:, :64])
    assert torch.equal(out["image_grid_thw"], tensors["inputs.image_grid_thw"])
    torch.testing.assert_close(out["pixel_values"], tensors["inputs.pixel_values"], atol=2e-2, rtol=0)


# ----------------------------------------------------------------------------- VRT text <-> ids
def test_vrt_text_encodes_by_arithmetic(tiny_processor):
    pp = PaDTProcessor(tiny_processor, V)
    tok = tiny_processor.tokenizer
    text = 'The "red box" <|VRT_5|><|VRT_0|> and "x"<|VRT_300|>.<|im_end|>'
    ids = pp.encode(text)
    assert ids.count(V + 5) == 1 and ids.count(V) == 1 and ids.count(V + 300) == 1
    assert pp.decode(ids) == text
    assert pp.encode("plain") == tok.encode("plain")
    with pytest.raises(ValueError, match="placeholder"):
        pp.encode("<|vision_pad|><|VRT_1|>")
    # the same ids as a tokenizer that holds <|VRT_k|> as added tokens at V + k (the authors' layout)
    authors = build_tiny_tokenizer()
    authors.add_special_tokens({"additional_special_tokens": [f"<|empty_token_{i}|>" for i in range(V - len(tok))]},
                               replace_extra_special_tokens=False)
    authors.add_tokens([f"<|VRT_{i}|>" for i in range(301)])
    assert authors.convert_tokens_to_ids("<|VRT_0|>") == V
    assert authors(text)["input_ids"] == ids
    assert len(tok) == 1022  # the wrapped tokenizer was never modified
    # through the processor call, batched, left-padded
    wrapper = VisonTextProcessingClass(tiny_processor, 2)
    wrapper.prepare(V)
    out = wrapper(text=[text, "short <|VRT_2|>"], padding=True, padding_side="left", return_tensors="pt")
    assert out["input_ids"][0].tolist() == ids
    assert out["input_ids"][1, -1].item() == V + 2
    assert wrapper.batch_decode(out["input_ids"], skip_special_tokens=True)[1] == "short <|VRT_2|>"
    plain = wrapper(text="no vrt here")["input_ids"]
    assert plain == [tok("no vrt here")["input_ids"]]
    listed = wrapper(text=["a <|VRT_1|>"])["input_ids"]  # return_tensors=None -> lists
    assert listed[0][-1] == V + 1
    with pytest.raises(ValueError, match="placeholder"):
        wrapper(text=["<|vision_pad|> <|VRT_1|>"])
    with pytest.raises(ValueError, match="tokenize=False"):
        wrapper.apply_chat_template([{"role": "user", "content": "a <|VRT_1|>"}], tokenize=True)


def test_tokenizer_that_already_holds_vrt_tokens(tiny_processor):
    authors = build_tiny_tokenizer()
    authors.add_special_tokens({"additional_special_tokens": [f"<|empty_token_{i}|>" for i in range(2)]},
                               replace_extra_special_tokens=False)
    authors.add_tokens([f"<|VRT_{i}|>" for i in range(10)])
    proc = build_tiny_processor(authors)
    wrapper = VisonTextProcessingClass(proc, 2)
    assert wrapper.model_embed_token_size == V  # detected from <|VRT_0|>, not len(tokenizer)
    wrapper.prepare(V)
    out = wrapper(text=["a <|VRT_3|><|VRT_20|>"], return_tensors="pt")
    assert out["input_ids"][0, -2:].tolist() == [V + 3, V + 20]
    with pytest.raises(ValueError, match=r"maps <\|VRT_0\|> to id 1024"):
        wrapper.prepare(2048)
    with pytest.raises(ValueError, match="collide"):
        check_vrt_base(build_tiny_tokenizer(), 1000)  # <|endoftext|> has id 1000


# ----------------------------------------------------------------------------- authors' quick start
def test_quick_start_with_visontextprocessingclass(tiny_processor):
    processor = VisonTextProcessingClass(tiny_processor, spatial_merge_size=2)
    processor.prepare(V)
    messages = [{"role": "user", "content": [
        {"type": "image", "image": _image(), "min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28},
        {"type": "text", "text": 'Please carefully check the image and detect the object this sentence describes: "a red box".'},
    ]}]  # fmt: skip
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs, video_inputs = process_vision_info(messages)
    inputs = processor(text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert torch.equal(processor.image_grid_thw, grid)
    prompt = inputs["input_ids"]
    prompt_copy = prompt.clone()
    glob = processor.assign_to_global_vrt_id(prompt, grid)
    assert torch.equal(glob, prompt) and torch.equal(prompt, prompt_copy)
    # a "generated" completion with global ids (one image: global == local), then back to local and parse
    completion = 'The "a red box" refers to <|VRT_1|><|VRT_5|><|VRT_6|> in this image.<|im_end|>'
    gen = torch.tensor([processor.encode(completion)])
    local = processor.assign_to_local_vrt_id(gen, grid)
    assert processor.batch_decode(local)[0] == completion
    steps = [(torch.randn(1, 1, 8),) for _ in range(local.shape[1])]
    completions, feats, labels, vrts, _ = parseVRTintoCompletion(processor, local, steps, torch.tensor([False]))
    assert completions == [completion] and labels == [["a red box"]]
    assert vrts == [["<|VRT_1|><|VRT_5|><|VRT_6|>"]] and feats[0][0].shape == (3, 8)
    assert processor.pid2vrt([1, 5, 6]) == vrts[0][0]
    assert processor.tokenizer is tiny_processor.tokenizer  # delegation
    with pytest.raises(AttributeError):
        processor.no_such_attribute  # noqa: B018


# ----------------------------------------------------------------------------- PaDTProcessor
def test_padt_processor_batch_left_padding_mixed_rows(tiny_processor):
    pp = PaDTProcessor(tiny_processor, V)
    img = _image()
    out = pp([img, None, [img, _image(56, 56)]], ['find "red box" <|VRT_3|>', "text only", "two images <|VRT_9|>"],
             return_image_sample_idx=True)
    assert out["input_ids"].shape == out["attention_mask"].shape == out["mm_token_type_ids"].shape
    assert (out["attention_mask"][:, -1] == 1).all()  # left padding
    assert out["attention_mask"][1, 0] == 0
    assert out["image_sample_idx"].tolist() == [0, 2, 2]
    assert out["image_grid_thw"].tolist() == [[1, 4, 8], [1, 4, 8], [1, 4, 4]]
    per_row_image_tokens = out["mm_token_type_ids"].sum(1).tolist()
    assert per_row_image_tokens == [8, 0, 12]
    assert (out["input_ids"] >= V).sum() == 2 and (out["input_ids"][0] == V + 3).sum() == 1
    glob = pp([img, None, [img, _image(56, 56)]], ['find "red box" <|VRT_3|>', "text only", "two images <|VRT_9|>"],
              global_vrt_ids=True)["input_ids"]
    assert (glob == V + 3).sum() == 1  # row 0: its image is first
    assert (glob == V + 8 + 9).sum() == 1  # row 2: local 9 -> its second image (cell 1) -> global 8 + 8 + 1
    assert "<|VRT_3|>" in pp.decode(out["input_ids"][0])
    assert pp.batch_decode(out["input_ids"])[1].endswith("text only<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="one entry per prompt"):
        pp([img], ["a", "b"])


def test_padt_processor_from_pretrained(tiny_processor, tmp_path):
    pp = PaDTProcessor(tiny_processor, V)
    pp.save_pretrained(tmp_path / "a")
    again = PaDTProcessor.from_pretrained(tmp_path / "a")
    assert again.vrt_base_id == V and again.spatial_merge_size == 2
    a, b = pp(_image(), "x <|VRT_4|>"), again(_image(), "x <|VRT_4|>")
    assert all(torch.equal(a[k], b[k]) for k in a)
    tiny_processor.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 1536}}))
    assert PaDTProcessor.from_pretrained(tmp_path / "b").vrt_base_id == 1536
    assert PaDTProcessor.from_pretrained(tmp_path / "b", vrt_base_id=2048).vrt_base_id == 2048
    tiny_processor.save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="pass vrt_base_id"):
        PaDTProcessor.from_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="collide"):
        PaDTProcessor(tiny_processor, 1000)


# ----------------------------------------------------------------------------- images
def test_fetch_image_and_process_vision_info(tmp_path):
    path = tmp_path / "img.png"
    _image(300, 200).save(path)
    img = fetch_image({"image": f"file://{path}", "min_pixels": 4 * 784, "max_pixels": 16 * 784})
    assert img.size[0] % 28 == 0 and img.size[1] % 28 == 0 and img.size[0] * img.size[1] <= 16 * 784
    assert fetch_image({"image": str(path), "resized_height": 100, "resized_width": 150}).size == (140, 112)
    assert fetch_image({"image_url": _image(50, 50)}, image_patch_size=16).size == (64, 64)
    buf = BytesIO()
    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    rgb = load_image(uri)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "hi"}]}]
    images, videos = process_vision_info(msgs)
    assert videos is None and len(images) == 1 and images[0].size == (308, 196)
    images, videos, video_kwargs = process_vision_info([msgs, msgs], return_video_kwargs=True)
    assert len(images) == 2 and video_kwargs == {}
    assert process_vision_info([{"role": "user", "content": "text only"}]) == (None, None)
    with pytest.raises(ValueError, match="video"):
        process_vision_info([{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}])
    with pytest.raises(TypeError):
        load_image(3)
