"""padt: Patch-as-Decodable-Token (PaDT, arXiv 2510.01954) on Hugging Face transformers 5.x.

Public names are imported lazily (PEP 562), so `import padt` is cheap and light submodules (parsing, masks, metrics)
work without loading the model code. Importing padt never patches transformers and never imports deepspeed or
flash_attn.
"""

from __future__ import annotations

from padt._lazy import lazy_exports

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

__all__ = ["__version__", *_EXPORTS]  # noqa: PLE0604 (the names are the keys: one list, not two)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
