"""The VRT-aware text layer (`VRTTextMixin`) and `PaDTProcessor`, padt's processor around a Qwen2.5-VL processor.

The authors' wrapper `VisonTextProcessingClass` [sic] shares the text layer and lives in `padt.legacy`; building and
loading the wrapped Qwen processor is `padt.processing.qwen`.

**VRT text <-> ids (design choice).** VRT ids are arithmetic (`padt.processing.vrt`,
docs/method.md#vrt-ids-and-the-extended-vocabulary): `<|VRT_k|>` is id ``V + k`` with ``V`` the model's embedding rows. We do **not** add `<|VRT_i|>` (or `<|empty_token_i|>`) strings to the tokenizer, so it
is never mutated, never persists thousands of extra entries, and ids never depend on the tokenizer's length
(adding 16k tokens is no longer slow with tokenizers 0.23, 0.07 s measured; but the authors' way also needs
`<|empty_token_*|>` padding up to V and grows the saved tokenizer):

- encoding: ``processor(text=...)`` through either wrapper replaces every `<|VRT_k|>` by one placeholder token
  that the tokenizer already holds as an atomic added token (`<|vision_pad|>`, unused by Qwen2.5-VL; a text that
  contains both VRTs and the placeholder string is rejected with `ValueError`), runs the real processor
  (padding, truncation, `<|image_pad|>` expansion, `mm_token_type_ids` all unchanged), then writes ``V + k`` at
  the placeholder positions in order. Because added tokens split the text before pre-tokenisation, this gives
  exactly the ids of a tokenizer that has `<|VRT_k|>` as added tokens (the authors' way). ``encode(text)`` is the
  same for plain strings without the processor.
- decoding: ``decode``/``batch_decode`` split a sequence at ids ``>= V``, decode the text runs with the
  tokenizer and render VRT ids as `<|VRT_k|>`.

A tokenizer saved by the authors' trainer may already hold `<|empty_token_*|>`/`<|VRT_*|>` entries; we check that
`<|VRT_k|>` maps to ``V + k`` (else `ValueError` explaining the mismatch) and that no other token has an id
``>= V``. Note: ``wrapper.tokenizer`` is the raw tokenizer and knows nothing of VRTs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature

from padt.processing.qwen import load_image, load_processor
from padt.processing.vrt import VRT_TOKEN_PATTERN, VRTCodec, image_sample_idx_from_counts, pid2vrt

VRT_PLACEHOLDER_CANDIDATES = ("<|vision_pad|>", "<|quad_start|>", "<|quad_end|>")
PADT_PROCESSOR_FILE = "padt_processor.json"


# ============================================================================ VRT-aware text layer
def _is_int_list(x) -> bool:
    return isinstance(x, (list, tuple)) and (len(x) == 0 or isinstance(x[0], (int, np.integer)))


def check_vrt_base(tokenizer, vrt_base_id: int) -> None:
    """`ValueError` unless every `<|VRT_k|>` in ``tokenizer`` has id ``V + k`` and no other token has id ``>= V``."""
    if int(getattr(tokenizer, "vocab_size", 0) or 0) > vrt_base_id:
        raise ValueError(f"the tokenizer's base vocabulary ({tokenizer.vocab_size}) is larger than vrt_base_id "
                         f"({vrt_base_id}); VRT ids would collide with text ids")
    for tid, added in tokenizer.added_tokens_decoder.items():
        content = getattr(added, "content", str(added))
        m = VRT_TOKEN_PATTERN.fullmatch(content)
        if m is not None:
            k = int(m.group(1))
            if tid != vrt_base_id + k:
                raise ValueError(
                    f"the tokenizer maps {content} to id {tid}, but VRT ids are vrt_base_id + k = {vrt_base_id + k} "
                    f"(vrt_base_id = the model's embedding rows = {vrt_base_id}). It was saved for a model with "
                    f"{tid - k} embedding rows: pass that vrt_base_id, or use a tokenizer without VRT entries"
                )
        elif tid >= vrt_base_id:
            raise ValueError(f"the tokenizer token {content!r} has id {tid} >= vrt_base_id {vrt_base_id}; "
                             "it would collide with VRT ids (is vrt_base_id the model's embedding rows?)")


class VRTTextMixin:
    """encode/decode/processor-call with arithmetic VRT ids. Needs ``self.tokenizer``, ``self.vrt_base_id``."""

    _processor: Any

    @property
    def tokenizer(self):
        return self._processor.tokenizer

    @property
    def codec(self) -> VRTCodec:
        return VRTCodec(self.vrt_base_id, self.spatial_merge_size)

    @property
    def completion_parser(self):
        """A cached `padt.processing.parsing.CompletionParser` for this tokenizer and V."""
        cached = self.__dict__.get("_completion_parser")
        if cached is None or cached.vrt_base_id != self.vrt_base_id:
            from padt.processing.parsing import CompletionParser

            cached = CompletionParser.from_tokenizer(self.tokenizer, self.vrt_base_id)
            self.__dict__["_completion_parser"] = cached
        return cached

    def _placeholder(self) -> tuple[str, int]:
        key = (id(self.tokenizer), len(self.tokenizer))
        cached = self.__dict__.get("_placeholder_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        added = {getattr(t, "content", str(t)): i for i, t in self.tokenizer.added_tokens_decoder.items()}
        for cand in VRT_PLACEHOLDER_CANDIDATES:
            if cand in added:
                self.__dict__["_placeholder_cache"] = (key, (cand, added[cand]))
                return cand, added[cand]
        raise ValueError(f"the tokenizer has none of {VRT_PLACEHOLDER_CANDIDATES} as an added token, which the "
                         "VRT text encoding uses as a placeholder")

    def encode(self, text: str) -> list[int]:
        """Text -> ids with `<|VRT_k|>` -> ``V + k`` (no special tokens added; one tokenizer call)."""
        ks = [int(m.group(1)) for m in VRT_TOKEN_PATTERN.finditer(text)]
        if not ks:
            return self.tokenizer.encode(text, add_special_tokens=False)
        placeholder, pid = self._placeholder()
        if placeholder in text:
            raise ValueError(f"text contains both VRT tokens and {placeholder}, which the VRT encoding uses as its "
                             "placeholder; remove the literal placeholder from the text")
        ids = self.tokenizer.encode(VRT_TOKEN_PATTERN.sub(placeholder, text), add_special_tokens=False)
        it = iter(ks)
        return [self.vrt_base_id + next(it) if t == pid else t for t in ids]

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """One sequence -> text; ids ``>= V`` become `<|VRT_k|>` (kept even with ``skip_special_tokens``)."""
        if torch.is_tensor(token_ids) or isinstance(token_ids, np.ndarray):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        V, pieces, run = self.vrt_base_id, [], []
        for t in token_ids:
            if t >= V:
                if run:
                    pieces.append(self.tokenizer.decode(run, skip_special_tokens=skip_special_tokens, **kwargs))
                    run = []
                pieces.append(f"<|VRT_{t - V}|>")
            else:
                run.append(t)
        if run:
            pieces.append(self.tokenizer.decode(run, skip_special_tokens=skip_special_tokens, **kwargs))
        return "".join(pieces)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        """Several sequences -> texts (see `decode`)."""
        if torch.is_tensor(sequences) or isinstance(sequences, np.ndarray):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    def escape_text(self, text: str) -> str:
        """Typed text with its special-token strings made plain text (`escape_special_text`)."""
        return escape_special_text(text, self.tokenizer)

    def pid2vrt(self, patch_ids) -> str:
        """Cell indices -> concatenated `<|VRT_i|>` string."""
        return pid2vrt(patch_ids)

    def apply_chat_template(self, conversation, **kwargs):
        """The wrapped processor's chat template. With ``tokenize=True`` a conversation holding `<|VRT_k|>` text
        raises `ValueError` (the raw processor would split it into bytes): render with ``tokenize=False`` and call
        this wrapper on the text instead."""
        if kwargs.get("tokenize", False) and VRT_TOKEN_PATTERN.search(json.dumps(conversation, default=str)):
            raise ValueError("the conversation contains <|VRT_k|> text: use apply_chat_template(..., tokenize=False) "
                             "and pass the text to this processor, which maps VRT strings to ids")
        return self._processor.apply_chat_template(conversation, **kwargs)

    def _call_processor(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        """The wrapped processor's ``__call__`` with `<|VRT_k|>` in ``text`` mapped to ``V + k``."""
        if text is None:
            return self._processor(images=images, text=text, videos=videos, **kwargs)
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        vrts = [[int(m.group(1)) for m in VRT_TOKEN_PATTERN.finditer(t)] for t in texts]
        if not any(vrts):
            return self._processor(images=images, text=text, videos=videos, **kwargs)
        placeholder, pid = self._placeholder()
        for b, t in enumerate(texts):
            if vrts[b] and placeholder in t:
                raise ValueError(f"text {b} contains both VRT tokens and {placeholder}, which the VRT encoding "
                                 "uses as its placeholder; remove the literal placeholder from the text")
        subst = [VRT_TOKEN_PATTERN.sub(placeholder, t) for t in texts]
        out = self._processor(images=images, text=subst[0] if single else subst, videos=videos, **kwargs)
        out["input_ids"] = self._fill_placeholders(out["input_ids"], pid, vrts)
        return out

    def _fill_placeholders(self, input_ids, pid: int, vrts: list[list[int]]):
        left_trunc = getattr(self.tokenizer, "truncation_side", "right") == "left"
        rows_in = input_ids.tolist() if (torch.is_tensor(input_ids) or isinstance(input_ids, np.ndarray)) else input_ids
        flat = _is_int_list(rows_in)
        rows = [list(rows_in)] if flat else [list(r) for r in rows_in]
        for b, row in enumerate(rows):
            where = [i for i, t in enumerate(row) if t == pid]
            ks = vrts[b]
            if len(where) != len(ks):  # truncation removed some VRTs
                ks = ks[len(ks) - len(where):] if left_trunc else ks[: len(where)]
            for i, k in zip(where, ks):
                row[i] = self.vrt_base_id + k
        if torch.is_tensor(input_ids):
            return torch.tensor(rows, dtype=input_ids.dtype, device=input_ids.device).reshape(input_ids.shape)
        if isinstance(input_ids, np.ndarray):
            return np.asarray(rows, dtype=input_ids.dtype).reshape(input_ids.shape)
        return rows[0] if flat else rows


TEXT_ESCAPE = "\u200b"  # zero-width space: splits a typed special-token string so no added token matches it


def escape_special_text(text: str, tokenizer) -> str:
    """Typed text -> text in which no special-token string is recognised: every occurrence of an added token of
    ``tokenizer`` (`<|im_end|>`, `<|im_start|>`, `<|image_pad|>`, ...) and of `<|VRT_k|>` gets a zero-width space
    after its first character, so it tokenises as plain characters (no chat turn injected, no image/VRT ids).

    Apply it to the user's text only, before the chat template adds its own special tokens."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    names = sorted({getattr(t, "content", str(t)) for t in tokenizer.added_tokens_decoder.values()}, key=len,
                   reverse=True)
    pattern = re.compile("|".join([re.escape(n) for n in names if len(n) > 1] + [VRT_TOKEN_PATTERN.pattern]))
    for _ in range(len(text) + 1):  # each pass breaks at least one match and creates none: a fixed point is reached
        escaped = pattern.sub(lambda m: m.group(0)[0] + TEXT_ESCAPE + m.group(0)[1:], text)
        if escaped == text:
            return text
        text = escaped
    return text


def detect_vrt_base(tokenizer) -> int | None:
    vrt0 = [i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "content", str(t)) == "<|VRT_0|>"]
    return vrt0[0] if vrt0 else None


# ============================================================================ our processor
class PaDTProcessor(VRTTextMixin):
    """Chat-templated, left-padded PaDT inputs and VRT-aware decoding around a Qwen2.5-VL processor.

    Args:
        processor: a Qwen2.5-VL processor (`load_processor`, `build_qwen_processor`, `AutoProcessor`).
        vrt_base_id (`int`): V, the model's embedding rows (``config.vocab_size``); `<|VRT_k|>` = ``V + k``.
        spatial_merge_size (`int`, *optional*): defaults to ``processor.image_processor.merge_size``.
    """

    def __init__(self, processor, vrt_base_id: int, spatial_merge_size: int | None = None):
        self._processor = processor
        merge = spatial_merge_size if spatial_merge_size is not None else processor.image_processor.merge_size
        self.spatial_merge_size = int(merge)
        self.vrt_base_id = int(vrt_base_id)
        check_vrt_base(processor.tokenizer, self.vrt_base_id)

    def __repr__(self) -> str:
        return (f"PaDTProcessor(vrt_base_id={self.vrt_base_id}, spatial_merge_size={self.spatial_merge_size}, "
                f"processor={type(self._processor).__name__})")

    @property
    def processor(self):
        return self._processor

    @property
    def image_processor(self):
        return self._processor.image_processor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, vrt_base_id: int | None = None, **kwargs) -> PaDTProcessor:
        """Load from a directory. V comes from ``vrt_base_id``, else ``padt_processor.json`` (our save), else the
        ``vocab_size`` of a ``config.json`` beside the processor files, else the tokenizer's `<|VRT_0|>` id.

        A missing folder, or one without tokenizer files or an image processor config, raises `FileNotFoundError`
        naming what is missing (`padt.model.loading.check_processor_folder`) before anything is built."""
        from padt.model.loading import CheckpointNotFoundError, check_processor_folder

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise CheckpointNotFoundError(f"{path}: no such processor folder (a saved processor directory is "
                                          "expected; no hub access)")
        check_processor_folder(path)
        processor = load_processor(path, **kwargs)
        merge = None
        saved = os.path.join(path, PADT_PROCESSOR_FILE)
        if os.path.isfile(saved):
            with open(saved, encoding="utf-8") as f:
                meta = json.load(f)
            merge = meta.get("spatial_merge_size")
            vrt_base_id = vrt_base_id if vrt_base_id is not None else meta.get("vrt_base_id")
        config_path = os.path.join(path, "config.json")
        if vrt_base_id is None and os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                cfg = json.load(f)
            vrt_base_id = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
        if vrt_base_id is None:
            vrt_base_id = detect_vrt_base(processor.tokenizer)
        if vrt_base_id is None:
            raise ValueError(f"cannot tell the VRT base id for {path!r}: pass vrt_base_id (the model's embedding "
                             "rows, config.vocab_size)")
        return cls(processor, vrt_base_id, merge)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the wrapped processor plus ``padt_processor.json`` (V and merge size)."""
        save_directory = os.fspath(save_directory)
        self._processor.save_pretrained(save_directory, **kwargs)
        with open(os.path.join(save_directory, PADT_PROCESSOR_FILE), "w", encoding="utf-8") as f:
            json.dump({"vrt_base_id": self.vrt_base_id, "spatial_merge_size": self.spatial_merge_size}, f, indent=2)

    @staticmethod
    def build_messages(image, prompt: str) -> list[dict]:
        """One user turn, image(s) before text (docs/method.md#tasks-and-prompts). ``image`` may be None, one image or
        a list of images."""
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": prompt}]
        return [{"role": "user", "content": content}]

    def __call__(
        self,
        images=None,
        prompts: str | Sequence[str] = (),
        *,
        add_generation_prompt: bool = True,
        global_vrt_ids: bool = False,
        return_image_sample_idx: bool = False,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Build model inputs for a batch of (image(s), prompt) pairs.

        Args:
            images: one entry per prompt: None (text only), an image (PIL / path / URL) or a list of images.
            prompts (`str` or list of `str`): user prompts; may contain `<|VRT_k|>` (local ids of that row).
            global_vrt_ids (`bool`): convert VRT ids to global ids over the batch's images.
            return_image_sample_idx (`bool`): add ``image_sample_idx`` `(num_images,)` (row of each image).

        Returns:
            `BatchFeature` with ``input_ids``/``attention_mask``/``mm_token_type_ids`` `(B, L)` (left-padded) and,
            when there are images, ``pixel_values`` `(sum t*h*w, C*T*P*P)` and ``image_grid_thw`` `(N, 3)`.
        """
        if isinstance(prompts, str):
            prompts, images = [prompts], [images]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty")
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} image entries for {len(prompts)} prompts (one entry per prompt)")
        rows = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        texts = [self.apply_chat_template(self.build_messages(r, p), tokenize=False,
                                          add_generation_prompt=add_generation_prompt) for r, p in zip(rows, prompts)]
        flat = [load_image(im) for r in rows for im in r]
        kwargs.setdefault("padding", True)
        kwargs.setdefault("padding_side", "left")
        out = self._call_processor(images=flat or None, text=texts, return_tensors=return_tensors, **kwargs)
        sample_idx = image_sample_idx_from_counts([len(r) for r in rows])
        if global_vrt_ids:
            grid = out.get("image_grid_thw")
            out["input_ids"] = self.codec.to_global(torch.as_tensor(out["input_ids"]), grid, sample_idx)
        if return_image_sample_idx:
            out["image_sample_idx"] = sample_idx
        return out

    def parse(self, token_ids, **kwargs):
        """Parse completion ids into objects (`padt.processing.parsing.CompletionParser.parse`/``parse_batch``)."""
        ids = token_ids.tolist() if torch.is_tensor(token_ids) else token_ids
        if _is_int_list(ids):
            return self.completion_parser.parse(ids, **kwargs)
        return self.completion_parser.parse_batch(ids, **kwargs)
