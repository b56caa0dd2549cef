"""Qwen2.5-VL processor construction and PIL-only image helpers, all usable without torchvision.

- `build_qwen_processor` / `load_processor`: the real `Qwen2_5_VLProcessor` where torchvision imports, else
  `ImageOnlyQwen2_5_VLProcessor` (same pixels and grids, no video processor).
- `load_image`, `fetch_image`, `process_vision_info`: drop-ins for ``qwen_vl_utils`` (images only), resizing with
  `padt.geometry.grids.smart_resize`.

The VRT-aware layer on top of these processors is `padt.processing.processor.PaDTProcessor`.
"""

from __future__ import annotations

import base64
import functools
import json
import os
from io import BytesIO
from typing import Any

from PIL import Image
from transformers import Qwen2_5_VLProcessor

from padt.geometry.grids import smart_resize
from padt.geometry.images import MAX_ASPECT_RATIO, check_aspect_ratio, read_image, to_rgb, upright

__all__ = [
    "ImageOnlyQwen2_5_VLProcessor",
    "build_qwen_processor",
    "fetch_image",
    "load_image",
    "load_processor",
    "process_vision_info",
    "torchvision_available",
]


@functools.lru_cache(maxsize=1)
def torchvision_available() -> bool:
    """True when torchvision imports (a wheel built for another torch fails with RuntimeError at import)."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without a video processor, so it builds without torchvision.

    transformers 5.23 refuses ``video_processor=None`` (its class check needs the torchvision video processor);
    dropping the argument from ``__init__`` removes it from ``get_attributes()``. Saved files name the real
    `Qwen2_5_VLProcessor`, so a saved directory loads with `AutoProcessor` wherever torchvision exists.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = Qwen2_5_VLProcessor.__name__
        # a video processor entry with the image geometry (class defaults for the rest), so that the saved
        # directory also loads as the full processor where torchvision exists
        ip = self.image_processor
        keys = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor")
        video = {k: getattr(ip, k) for k in keys if getattr(ip, k, None) is not None}
        out.setdefault("video_processor", {"video_processor_type": "Qwen2VLVideoProcessor", **video})
        return out

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        out = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        self.tokenizer._set_processor_class(Qwen2_5_VLProcessor.__name__)
        path = os.path.join(save_directory, "tokenizer_config.json")
        if os.path.isfile(path):  # the tokenizer was saved with this subclass' name; name the real class
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            cfg["processor_class"] = Qwen2_5_VLProcessor.__name__
            with open(path, "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2, ensure_ascii=False)
        return out


def build_qwen_processor(
    tokenizer,
    *,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    temporal_patch_size: int = 2,
    chat_template: str | None = None,
):
    """A Qwen2.5-VL processor around ``tokenizer``.

    With torchvision: the real `Qwen2_5_VLProcessor` (torchvision image backend + `Qwen2VLVideoProcessor`).
    Without: `ImageOnlyQwen2_5_VLProcessor` with `Qwen2VLImageProcessorPil`. Pixels and grids agree between the two.
    """
    geometry = {"patch_size": patch_size, "temporal_patch_size": temporal_patch_size, "merge_size": spatial_merge_size}
    size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if torchvision_available():
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(size=size, **geometry),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(**geometry),
            chat_template=template,
        )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(size=size, **geometry), tokenizer=tokenizer, chat_template=template
    )


def load_processor(path: str | os.PathLike, **kwargs):
    """Load a saved Qwen2.5-VL processor dir (tokenizer files + preprocessor_config.json + chat template).

    Uses `Qwen2_5_VLProcessor` (video processor from its config or defaults) when torchvision imports, else
    `ImageOnlyQwen2_5_VLProcessor` with the PIL image backend. ``kwargs`` go to ``from_pretrained``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory (a saved processor directory is expected; no hub access)")
    if torchvision_available():
        return Qwen2_5_VLProcessor.from_pretrained(path, **kwargs)
    return ImageOnlyQwen2_5_VLProcessor.from_pretrained(path, **kwargs)


# ============================================================================ PIL-only drop-ins for qwen_vl_utils
def load_image(image: Image.Image | str | os.PathLike, max_aspect_ratio: float | None = MAX_ASPECT_RATIO
               ) -> Image.Image:
    """PIL image, path, ``file://`` path, ``data:image/...;base64,`` URI or http(s) URL -> upright RGB PIL image.

    The EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), so boxes and masks come back in the frame a
    viewer shows. Every PIL mode becomes 8-bit RGB by `padt.geometry.images.to_rgb`: 16-bit scaled by 255/65535,
    float by its value range, CMYK / palette / grey converted, and transparent images composited on white (as
    qwen_vl_utils does).

    Args:
        max_aspect_ratio: images whose long side is more than this times the short side raise a ValueError naming
            the size (the processor's limit, 200); None skips the check.

    Raises:
        FileNotFoundError: a path that does not exist. ValueError: a directory, a malformed data URI, an unreadable
        mode or a too-elongated image. TypeError: anything else than an image, path or URL.
    """
    if isinstance(image, Image.Image):
        img = to_rgb(upright(image))
        img = image.copy() if img is image else img  # a new image, as ``convert`` gave: callers may draw on it
    elif isinstance(image, (str, os.PathLike)):
        src = os.fspath(image)
        if src.startswith(("http://", "https://")):
            from urllib.request import urlopen

            with urlopen(src) as resp:  # a user-supplied URL, as in qwen_vl_utils
                img = Image.open(BytesIO(resp.read()))
            img.load()
            img = to_rgb(upright(img))
        elif src.startswith("data:image"):
            if "base64," not in src:
                raise ValueError("data URI images must be base64-encoded ('data:image/...;base64,...')")
            img = Image.open(BytesIO(base64.b64decode(src.split("base64,", 1)[1])))
            img.load()
            img = to_rgb(upright(img))
        else:
            img = read_image(src.removeprefix("file://"))
    else:
        raise TypeError(f"expected a PIL image, a path or a URL, got {type(image).__name__}")
    if max_aspect_ratio is not None:
        what = f"image {os.fspath(image)}" if isinstance(image, (str, os.PathLike)) and len(os.fspath(image)) < 300 \
            else "image"
        check_aspect_ratio(img.width, img.height, max_aspect_ratio, what=what)
    return img


def fetch_image(ele: dict, image_patch_size: int = 14, spatial_merge_size: int = 2) -> Image.Image:
    """PIL-only equivalent of ``qwen_vl_utils.fetch_image``: load ``ele["image"]`` (or ``"image_url"``), resize.

    Honours ``resized_height``/``resized_width`` or ``min_pixels``/``max_pixels`` in ``ele``; the size factor is
    ``image_patch_size * spatial_merge_size``.
    """
    if "image" not in ele and "image_url" not in ele:
        raise ValueError(f"message element has no 'image' or 'image_url': {sorted(ele)}")
    img = load_image(ele["image"] if "image" in ele else ele["image_url"])
    factor = image_patch_size * spatial_merge_size
    if "resized_height" in ele and "resized_width" in ele:
        h, w = smart_resize(int(ele["resized_height"]), int(ele["resized_width"]), factor,
                            ele.get("min_pixels"), ele.get("max_pixels"))
    else:
        h, w = smart_resize(img.height, img.width, factor, ele.get("min_pixels"), ele.get("max_pixels"))
    return img.resize((w, h))


def process_vision_info(conversations: list, return_video_kwargs: bool = False, image_patch_size: int = 14):
    """Drop-in for ``qwen_vl_utils.process_vision_info`` for images (no torchvision): ``(images or None, None)``.

    ``conversations`` is one message list or a list of them. Videos raise `ValueError` (they need qwen_vl_utils
    and torchvision). With ``return_video_kwargs=True`` an empty dict is returned third, as qwen_vl_utils does.
    """
    convs = conversations if conversations and isinstance(conversations[0], list) else [conversations]
    images = []
    for conv in convs:
        for message in conv:
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for ele in content:
                if not isinstance(ele, dict):
                    continue
                if "video" in ele or ele.get("type") == "video":
                    raise ValueError("video inputs need qwen_vl_utils and torchvision; padt's fallback handles images")
                if "image" in ele or "image_url" in ele or ele.get("type") in ("image", "image_url"):
                    images.append(fetch_image(ele, image_patch_size=image_patch_size))
    out = (images or None, None)
    return (*out, {}) if return_video_kwargs else out
