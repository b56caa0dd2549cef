"""padt: Patch-as-Decodable-Token (PaDT, arXiv 2510.01954) on Hugging Face transformers 5.x.

Public names are imported lazily (PEP 562), so `import padt` is cheap and light submodules (parsing, masks, metrics)
work without loading the model code. Importing padt never patches transformers and never imports deepspeed or
flash_attn.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # model
    "PaDTConfig": "padt.model.backbones.qwen2_5_vl",
    "PaDTForConditionalGeneration": "padt.model.backbones.qwen2_5_vl",
    "PaDTCausalLMOutput": "padt.model.outputs",
    "PaDTGenerateOutput": "padt.model.outputs",
    "VRTImageState": "padt.model.image_state",
    "PaDTDecoder": "padt.model.decoder.decoder",
    # processing (authors' names and ours)
    "VisonTextProcessingClass": "padt.legacy",
    "PaDTProcessor": "padt.processing",
    "VRTCodec": "padt.processing.vrt",
    "parseVRTintoCompletion": "padt.legacy",
    "parse_completion": "padt.processing.parsing",
    # one-call inference
    "PaDTPredictor": "padt.inference.predictor",
    "Prediction": "padt.inference.predictor",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'padt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
