"""One call from image + prompt to text + objects (label, box, mask, score, VRT cells): `PaDTPredictor`.

    predictor = PaDTPredictor.from_pretrained("PaDT-MLLM/PaDT_Pro_3B")      # or a local directory
    [pred] = predictor.predict(Image.open("cat.jpg"), 'Please carefully check the image and detect ...')
    pred.text, pred.objects[0].box_xyxy, pred.objects[0].mask, pred.objects[0].score

Like SAM's `SamPredictor`, it keeps image I/O and coordinate conversions out of the `nn.Module`s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LogitsProcessorList

from padt.model.backbones import padt_classes_for
from padt.model.modeling import PaDTModelMixin
from padt.processing.features import gather_object_features, unpack_per_object
from padt.processing.generation import DistinctVRTLogitsProcessor
from padt.processing.processor import PaDTProcessor
from padt.processing.qwen import load_image


@dataclass
class PredictedObject:
    """One decoded object.

    Attributes:
        label: the object's label in the completion ("" when the text gives none, e.g. captions).
        vrt_ids: VRT cells (local to the sample's image, row-major over its merged grid).
        box_xyxy: `(4,)` box in pixels of the original image, clipped to it.
        box_cxcywh: `(4,)` the decoder's normalised (cx, cy, w, h) in [0, 1].
        score: sigmoid of the score logit (an IoU-quality estimate).
        mask: `(H, W)` bool mask at the original image size, or None when the mask head is off.
    """

    label: str
    vrt_ids: list[int]
    box_xyxy: list[float]
    box_cxcywh: list[float]
    score: float
    mask: np.ndarray | None = None


@dataclass
class Prediction:
    """The completion of one (image, prompt) pair and its objects."""

    text: str
    objects: list[PredictedObject] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)  # (width, height) of the original image
    grid_thw: tuple[int, int, int] | None = None  # processor's patch grid of the image


def cxcywh_to_xyxy_pixels(box: torch.Tensor, width: int, height: int) -> list[float]:
    """Normalised (cx, cy, w, h) -> pixel (x1, y1, x2, y2) clipped to the image."""
    cx, cy, w, h = box.tolist()
    x1, y1 = max(cx - w / 2, 0.0) * width, max(cy - h / 2, 0.0) * height
    x2, y2 = min(cx + w / 2, 1.0) * width, min(cy + h / 2, 1.0) * height
    return [x1, y1, x2, y2]


def mask_to_image(mask_logits: torch.Tensor, valid_hw: tuple[int, int], upscale: int, size: tuple[int, int]) -> np.ndarray:
    """Crop padded mask logits to the image's valid region, resize bilinearly to (H, W) and threshold (as the
    authors' evaluation, ``eval/evaluation_scripts/utils.py``; docs/evaluation.md).

    Args:
        mask_logits (`torch.Tensor` of shape `(4*Hmax, 4*Wmax)`); valid_hw: the image's 14-px grid (h, w);
        upscale: mask pixels per patch side (4); size: (width, height) of the original image.
    """
    h, w = valid_hw
    crop = mask_logits[: upscale * h, : upscale * w].float()[None, None]
    full = F.interpolate(crop, size=(size[1], size[0]), mode="bilinear", align_corners=False)[0, 0]
    return (full.sigmoid() > 0.5).cpu().numpy()


def check_max_new_tokens(max_new_tokens) -> int:
    """`max_new_tokens` as an int >= 1, else `ValueError` naming it (0 would otherwise fall back to the default)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return int(max_new_tokens)


def cli_generation_error(max_new_tokens: int, device: str | None) -> str | None:
    """The one-line error of a command line's `--max-new-tokens` / `--device`, or None when both are usable (the demo
    and the app print it and exit 2)."""
    if max_new_tokens < 1:
        return f"--max-new-tokens must be >= 1, got {max_new_tokens}"
    try:
        check_device(device)
    except ValueError as err:
        return f"--device: {err}"
    return None


def check_device(device: str | torch.device | None) -> torch.device | None:
    """`device` as a `torch.device` (None stays None), or `ValueError` for an unknown device string or a CUDA device
    when CUDA is not available in this torch build."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ({err}); use e.g. cpu, cuda or cuda:1") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available in this torch build; use --device cpu "
                         "(device='cpu')")
    return dev


def context_limit(model) -> int | None:
    """The model's context length (``config.text_config.max_position_embeddings``), or None when it has none."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    limit = getattr(text_config, "max_position_embeddings", None)
    return int(limit) if limit else None


class PaDTPredictor:
    """Batched inference: prompts -> generate -> parse VRT runs -> `vl_decode` -> boxes/masks in image pixels."""

    def __init__(
        self,
        model: PaDTModelMixin,
        processor: PaDTProcessor,
        max_new_tokens: int = 256,
        distinct_vrts: bool = False,
    ):
        """`distinct_vrts`: forbid repeating a VRT within one object's run (`padt.processing.generation`; off = authors')."""
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = check_max_new_tokens(max_new_tokens)
        self.distinct_vrts = distinct_vrts

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
        **kwargs,
    ) -> PaDTPredictor:
        """Load model and processor from one directory (or hub id). Default device: cuda if available, else cpu;
        default dtype: bfloat16 on cuda, float32 on cpu."""
        device = check_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        _, model_class = padt_classes_for(path)
        model = model_class.from_pretrained(path, dtype=dtype).to(device)
        processor = PaDTProcessor.from_pretrained(path, vrt_base_id=model.config.vrt_base_id)
        return cls(model, processor, **kwargs)

    @torch.no_grad()
    def predict(
        self,
        images: Image.Image | str | os.PathLike | list,
        prompts: str | list[str],
        max_new_tokens: int | None = None,
        raw_prompt: bool = False,
        **generate_kwargs,
    ) -> list[Prediction]:
        """Run one prompt per image (lists are batched with left padding). Returns one `Prediction` per pair.

        Prompts are typed text: special-token strings in them (`<|im_end|>`, `<|image_pad|>`, `<|VRT_k|>`, ...) are
        escaped so they tokenise as plain text (`padt.processing.processor.escape_special_text`); pass
        ``raw_prompt=True`` to have them read as special tokens. Raises `ValueError` for ``max_new_tokens < 1`` and
        for a prompt (image tokens included) longer than the model's context."""
        max_new_tokens = check_max_new_tokens(self.max_new_tokens if max_new_tokens is None else max_new_tokens)
        single = not isinstance(prompts, list)
        prompts = [prompts] if single else prompts
        images = [images] if not isinstance(images, list) else images
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one image per prompt")
        if not raw_prompt:
            prompts = [self.processor.escape_text(p) for p in prompts]
        pil = [load_image(im) for im in images]
        inputs = self.processor(images=pil, prompts=prompts).to(self.model.device)
        self._check_context(inputs["attention_mask"])
        if self.distinct_vrts:
            processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
            processors.append(DistinctVRTLogitsProcessor(self.model.config.vrt_base_id))
            generate_kwargs["logits_processor"] = processors
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=generate_kwargs.pop("do_sample", False),
            return_dict_in_generate=True,
            **generate_kwargs,
        )
        prompt_len = inputs["input_ids"].shape[1]
        grid = inputs["image_grid_thw"]
        local = self.processor.codec.to_local(out.sequences[:, prompt_len:], grid)
        cells = self.processor.codec.cells_per_image(grid)  # one image per row
        objects = [self.processor.parse(row, num_cells=cells[b]) for b, row in enumerate(local.tolist())]
        preds = [
            Prediction(text=self.processor.decode(row, skip_special_tokens=False), image_size=im.size,
                       grid_thw=tuple(grid[b].tolist()))
            for b, (row, im) in enumerate(zip(local.tolist(), pil))
        ]
        if not any(objects):
            return preds
        feats, lengths, _ = gather_object_features(out.vrt_hidden_states, objects)
        state = out.padt_state
        decoded = self.model.vl_decode(unpack_per_object(feats, lengths, objects), state.prototypes,
                                       state.high_res_embeds, grid, state.pos_embeds)
        hs, ws = decoded["pred_mask_valid_hw"]
        upscale = self.model.vl_decoder.mask_upscale
        k = 0
        for b, objs in enumerate(objects):
            width, height = pil[b].size
            for obj in objs:
                box = decoded["pred_boxes"][k].float().cpu()
                mask = None
                if decoded.get("pred_mask") is not None and decoded["pred_mask"].numel():
                    mask = mask_to_image(decoded["pred_mask"][k], (int(hs[k]), int(ws[k])), upscale, (width, height))
                preds[b].objects.append(PredictedObject(
                    label=obj.label, vrt_ids=list(obj.vrt_ids), box_xyxy=cxcywh_to_xyxy_pixels(box, width, height),
                    box_cxcywh=box.tolist(), score=float(decoded["pred_score"][k].float().sigmoid()), mask=mask,
                ))
                k += 1
        return preds

    def _check_context(self, attention_mask: torch.Tensor) -> None:
        """`ValueError` when a prompt's tokens (image tokens included) exceed the model's context."""
        limit = context_limit(self.model)
        if limit is None:
            return
        lengths = attention_mask.sum(dim=1).tolist()
        for b, n in enumerate(lengths):
            if n > limit:
                raise ValueError(f"prompt {b} is {int(n)} tokens long (image tokens included), more than the model's "
                                 f"context of {limit} tokens (config.text_config.max_position_embeddings); shorten "
                                 "the prompt or use a smaller image")
