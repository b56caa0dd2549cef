"""Tiny PaDT configurations built in code: the real Qwen2.5-VL architecture at toy sizes (tests, CPU demos, the shapes
benchmark). No download: weights are random (or trained locally)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from padt.model.backbones.qwen2_5_vl import PaDTConfig

QWEN_SPECIAL_TOKEN_NAMES = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def tiny_padt_config(
    *,
    vocab_size: int = 320,
    image_token_id: int = 300,
    video_token_id: int = 301,
    vision_start_token_id: int = 302,
    vision_end_token_id: int = 303,
    bos_token_id: int = 304,
    eos_token_id: int = 305,
    pad_token_id: int = 304,
    tie_word_embeddings: bool = False,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    window_size: int = 56,
    text_rope_theta: float = 1e6,
    mrope_section: list[int] | None = None,
    vision_rope_theta: float = 10000.0,
    **overrides: Any,
) -> PaDTConfig:
    """A PaDT config with a 2-layer LLM (width 64, 4 heads, 2 KV heads), a 2-block ViT (width 32, window 56 px = 2x2
    merged cells, block 1 full attention) and a decoder of the ViT's width. `overrides` go to `PaDTConfig`.

    Rotary defaults are Qwen2.5-VL's (text theta 1e6, vision theta 1e4). At toy head sizes they leave the image rows
    and columns almost unrotated (the h/w mrope sections get the lowest frequencies), so a model trained from scratch
    cannot tell where a cell is; `text_rope_theta`, `mrope_section` (t, h, w; sums to head_dim / 2) and
    `vision_rope_theta` set them for such a model (see docs/shapes.md)."""
    head_dim = text_hidden_size // 4
    quarter = head_dim // 2 // 4  # mrope sections (t, h, w) must sum to head_dim / 2
    if mrope_section is None:
        mrope_section = [head_dim // 2 - 2 * quarter, quarter, quarter]
    if len(mrope_section) != 3 or sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section={mrope_section} must be 3 ints (t, h, w) summing to head_dim / 2 = "
                         f"{head_dim // 2}")
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": text_hidden_size,
        "intermediate_size": 2 * text_hidden_size,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": text_rope_theta, "mrope_section": list(mrope_section)},
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "tie_word_embeddings": tie_word_embeddings,
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": 2 * vision_hidden_size,
        "num_heads": vision_heads,
        "rope_parameters": {"rope_type": "axial", "rope_theta": vision_rope_theta},
        "in_channels": 3,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": window_size,
        "fullatt_block_indexes": [vision_depth - 1],
        "out_hidden_size": text_hidden_size,
        "tokens_per_second": 2,
    }
    return PaDTConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id,
        vision_end_token_id=vision_end_token_id,
        tie_word_embeddings=tie_word_embeddings,
        **overrides,
    )


def tiny_padt_config_for_tokenizer(tokenizer: Any, **kwargs: Any) -> PaDTConfig:
    """`tiny_padt_config` whose special ids come from a Qwen-style tokenizer; the embedding has `len(tokenizer)` rows
    (rounded up to a multiple of 64), so `<|VRT_0|>` = that row count."""
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in QWEN_SPECIAL_TOKEN_NAMES.items()}
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows = -(-len(tokenizer) // 64) * 64
    return tiny_padt_config(vocab_size=kwargs.pop("vocab_size", rows), bos_token_id=pad, eos_token_id=eos,
                            pad_token_id=pad, **ids, **kwargs)


def sample_image(width: int = 224, height: int = 168):
    """A synthetic scene (a red box and a blue disk, `padt.testing.sft_data`'s colours, on a grey-green background) as
    a PIL image. Its shapes sit at fractions of the image size, not in integer pixel boxes, so it is drawn here rather
    than with `padt.shapes.scenes.paint_shape` (whose boxes would move them by a pixel and change `sample.png`)."""
    from PIL import Image, ImageDraw

    from padt.testing.sft_data import COLOURS

    img = Image.new("RGB", (width, height), (110, 130, 115))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width * 0.1, height * 0.2, width * 0.45, height * 0.7], fill=COLOURS["red"])
    draw.ellipse([width * 0.55, height * 0.35, width * 0.9, height * 0.85], fill=COLOURS["blue"])
    return img


def build_tiny_checkpoint(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    placeholder: bool = True,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    **config_kwargs: Any,
) -> Path:
    """Save a tiny PaDT model (random weights), its `PaDTProcessor` and `sample.png` to `out_dir`; returns it.

    `placeholder=True` gives the prototype norm weight 1 so that an untrained model can emit VRTs (pipeline tests);
    `False` keeps the authors' zero init (a training start, as from a base model). `config_kwargs` go to
    `tiny_padt_config` (sizes); `min_pixels`/`max_pixels` to the image processor (`build_tiny_processor`'s defaults
    when None). `PaDTForConditionalGeneration.from_pretrained(out_dir)` and `PaDTProcessor.from_pretrained(out_dir)`
    load it.
    """
    import torch

    from padt.model.backbones.qwen2_5_vl import PaDTForConditionalGeneration
    from padt.processing.processor import PaDTProcessor
    from padt.testing.tokenizer import build_tiny_processor, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    processor = build_tiny_processor(tok, min_pixels=min_pixels, max_pixels=max_pixels)
    config = tiny_padt_config_for_tokenizer(tok, **config_kwargs)
    torch.manual_seed(seed)
    model = PaDTForConditionalGeneration(config)
    if placeholder:
        with torch.no_grad():
            model.vis_norm.weight.fill_(1.0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    PaDTProcessor(processor, config.vrt_base_id).save_pretrained(out)
    sample_image().save(out / "sample.png")
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write a tiny random PaDT checkpoint + processor + sample image.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--training-start", action="store_true", help="authors' zero-init prototype norm (not a placeholder)")
    ap.add_argument("--text-hidden-size", type=int, default=64)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--vision-hidden-size", type=int, default=32)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--vision-heads", type=int, default=2)
    ap.add_argument("--window-size", type=int, default=56, help="ViT attention window in px")
    ap.add_argument("--text-rope-theta", type=float, default=1e6)
    ap.add_argument("--mrope-section", type=int, nargs=3, default=None, metavar=("T", "H", "W"))
    ap.add_argument("--vision-rope-theta", type=float, default=10000.0)
    ap.add_argument("--vrt-feature-order", choices=("window", "merge_block"), default="window")
    ap.add_argument("--no-prototype-projection", action="store_true",
                    help="prototypes = the merged image embeddings themselves (the paper's ablation)")
    ap.add_argument("--min-pixels", type=int, default=None)
    ap.add_argument("--max-pixels", type=int, default=None)
    a = ap.parse_args(argv)
    build_tiny_checkpoint(
        a.out, a.seed, placeholder=not a.training_start, min_pixels=a.min_pixels, max_pixels=a.max_pixels,
        text_hidden_size=a.text_hidden_size, text_layers=a.text_layers, vision_hidden_size=a.vision_hidden_size,
        vision_depth=a.vision_depth, vision_heads=a.vision_heads, window_size=a.window_size,
        text_rope_theta=a.text_rope_theta, mrope_section=a.mrope_section, vision_rope_theta=a.vision_rope_theta,
        vrt_feature_order=a.vrt_feature_order, use_visual_prototype_projection=not a.no_prototype_projection,
    )


if __name__ == "__main__":
    main()
