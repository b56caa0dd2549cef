"""Tiny offline Qwen2-style tokenizer and Qwen2.5-VL processor for tests and toy models.

`build_tiny_tokenizer` trains a byte-level BPE (the `tokenizers` library, Qwen2's pre-tokenizer split) on a
deterministic toy corpus that covers PaDT's prompt and answer templates (docs/method.md#tasks-and-prompts), wraps it
as transformers' `Qwen2Tokenizer`, appends the 22 Qwen2.5 special tokens in Qwen's order (so `<|endoftext|>` is the
first id after the BPE vocabulary, like 151643 in the real one), sets eos `<|im_end|>`, pad `<|endoftext|>` and the
Qwen-VL chat template. Same inputs -> same tokenizer, in well under a second. No hub access.
"""

from __future__ import annotations

import functools
import json
import random

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

# Qwen2.5 added tokens in id order (151643..151664 in the real vocabulary) and whether each is "special".
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)  # fmt: skip

# Qwen2's pre-tokenizer split pattern (contractions, letters, single digits, punctuation runs, newlines, spaces).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Same structure as the official Qwen2-VL / Qwen2.5-VL chat template (image before text, default system prompt).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_NOUNS = (
    "person", "cat", "dog", "car", "truck", "bus", "bicycle", "motorcycle", "horse", "bird", "cup", "bottle",
    "chair", "table", "laptop", "phone", "book", "clock", "tree", "boat", "square", "circle", "triangle", "disk",
    "bar", "box", "ring", "cross", "star", "shape", "object", "man", "woman", "child", "fence", "road",
)  # fmt: skip
_ADJECTIVES = (
    "red", "green", "blue", "yellow", "white", "black", "orange", "purple", "large", "small", "tall", "left",
    "right", "top", "bottom", "middle", "first", "second", "other",
)  # fmt: skip
_TEMPLATES = (
    'Please carefully check the image and detect the following objects: ["{n}", "{m}"].',
    'Please carefully check the image and detect the object this sentence describes: "the {a} {n}".',
    "Please describe this image.",
    'There is 1 "{n}" (<|Obj_0|>) in this image.',
    'There are 2 "{n}" (<|Obj_0|>, <|Obj_1|>) in this image.',
    'In this image, there are 1 "{n}" (<|Obj_0|>), 2 "{m}" (<|Obj_1|>, <|Obj_2|>).',
    'The "the {a} {n} on the {b}" refers to <|Obj_0|> in this image.',
    "A {a} {n} (<|Obj_0|>) is next to a {b} {m} (<|Obj_1|>) near the {n}.",
    "No objects from the list are present in the image.",
    "Found \"{a} {n}\" and the \"{b} {m}\".",
    "Where is the {a} {n}? It is at the {b} of the picture, 0 1 2 3 4 5 6 7 8 9.",
)


def toy_corpus(n_lines: int = 1500, seed: int = 0) -> list[str]:
    """Deterministic toy corpus: PaDT prompt/answer templates filled with nouns/adjectives, plus number lines."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        t = rng.choice(_TEMPLATES)
        lines.append(t.format(n=rng.choice(_NOUNS), m=rng.choice(_NOUNS), a=rng.choice(_ADJECTIVES),
                              b=rng.choice(_ADJECTIVES)))
    lines += [" ".join(str(rng.randint(0, 1000)) for _ in range(12)) for _ in range(50)]
    # pseudo-words so that a few thousand merges exist
    syll = ("ka", "to", "ri", "mo", "an", "el", "ing", "er", "th", "qu", "ze", "lo", "pa", "st", "ion",
            "ve", "ra", "ne", "ch", "ou", "sh", "bi", "du", "ly", "ex", "or", "al", "ma", "ti", "co")
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(8000)]
    lines += [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    lines += ["You are a helpful assistant.", "system user assistant"] * 20
    return lines


@functools.lru_cache(maxsize=8)
def _train_bpe(vocab_size: int, seed: int) -> tuple[str, str]:
    """Train the byte-level BPE once per (vocab_size, seed); returns (vocab json, merges json) strings."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(toy_corpus(seed=seed), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return json.dumps(model["vocab"]), json.dumps(model["merges"])


def build_tiny_tokenizer(vocab_size: int = 1000, seed: int = 0) -> Qwen2Tokenizer:
    """A fresh tiny Qwen2 tokenizer: ``vocab_size`` BPE entries (>= 256 bytes) + the 22 Qwen added tokens.

    Ids: BPE ``[0, vocab_size)`` (may be slightly fewer if the corpus runs out of merges), then `<|endoftext|>`,
    `<|im_start|>`, `<|im_end|>`, ... `<|file_sep|>` in Qwen's order. eos = `<|im_end|>`, pad = `<|endoftext|>`,
    no bos, chat template = `QWEN_VL_CHAT_TEMPLATE`. Every call returns a new object (safe to mutate).
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    vocab_json, merges_json = _train_bpe(int(vocab_size), int(seed))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(merges_json)]
    tok = Qwen2Tokenizer(
        vocab=json.loads(vocab_json),
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=None,  # set after the added tokens so that ids follow Qwen's order
        pad_token=None,
        errors="replace",
    )
    specials = [AddedToken(t, special=True, normalized=False) for t, s in QWEN_ADDED_TOKENS if s]
    others = [AddedToken(t, special=False, normalized=False) for t, s in QWEN_ADDED_TOKENS if not s]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens(others)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tok


def build_tiny_processor(
    tokenizer: Qwen2Tokenizer | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    temporal_patch_size: int = 2,
):
    """Qwen2.5-VL processor around ``tokenizer`` (default: `build_tiny_tokenizer()`).

    Pixel limits default to 4 and 256 cells of ``(patch_size * spatial_merge_size)**2`` pixels (small images for
    CPU tests). Uses `padt.processing.qwen.build_qwen_processor`: the real `Qwen2_5_VLProcessor` with a video processor
    when torchvision is installed, else the image-only subclass with the PIL image processor backend.
    """
    from padt.processing.qwen import build_qwen_processor

    cell_pixels = (patch_size * spatial_merge_size) ** 2
    return build_qwen_processor(
        tokenizer if tokenizer is not None else build_tiny_tokenizer(),
        min_pixels=4 * cell_pixels if min_pixels is None else min_pixels,
        max_pixels=256 * cell_pixels if max_pixels is None else max_pixels,
        patch_size=patch_size,
        spatial_merge_size=spatial_merge_size,
        temporal_patch_size=temporal_patch_size,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
