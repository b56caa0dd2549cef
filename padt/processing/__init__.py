"""Text side of PaDT: VRT id arithmetic (`vrt`), Qwen processor construction and image helpers (`qwen`), the VRT-aware
processor (`processor`), completion parsing (`parsing`), the decoder's feature gathering (`features`) and generation
helpers (`generation`).

The names below keep their import path ``padt.processing`` (the drop-ins documented in the README among them:
``from padt.processing import process_vision_info, smart_resize, build_qwen_processor, ...``). They are imported
lazily (PEP 562), so that ``padt.processing.vrt`` and ``padt.processing.parsing`` stay light, and so that the authors'
`VisonTextProcessingClass` (in `padt.legacy`, which imports the model) can be re-exported here without an import cycle.
"""

from __future__ import annotations

from padt._lazy import lazy_exports

_EXPORTS = {
    # padt's processor and its checks
    "PaDTProcessor": "padt.processing.processor",
    "check_vrt_base": "padt.processing.processor",
    "PADT_PROCESSOR_FILE": "padt.processing.processor",
    "VRT_PLACEHOLDER_CANDIDATES": "padt.processing.processor",
    # Qwen processor construction, torchvision-free
    "ImageOnlyQwen2_5_VLProcessor": "padt.processing.qwen",
    "build_qwen_processor": "padt.processing.qwen",
    "load_processor": "padt.processing.qwen",
    "torchvision_available": "padt.processing.qwen",
    # drop-ins for qwen_vl_utils
    "load_image": "padt.processing.qwen",
    "fetch_image": "padt.processing.qwen",
    "process_vision_info": "padt.processing.qwen",
    "smart_resize": "padt.geometry.grids",
    # VRT ids
    "VRTCodec": "padt.processing.vrt",
    "pid2vrt": "padt.processing.vrt",
    # the authors' wrapper [sic]
    "VisonTextProcessingClass": "padt.legacy",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
