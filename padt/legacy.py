"""The authors' compatibility surface, and nothing else.

PaDT's authors (github.com/Gorilla-Lab-SCUT/PaDT) published `PaDTForConditionalGeneration`, `VisonTextProcessingClass`
[sic], `parseVRTintoCompletion`, `model.vl_decode`, `forward(is_main=...)`, the four `past_*` image-state arguments, the
transformers-4.50 path `model.model.embed_tokens` and their aggregate loss names. Code written against their API keeps
working through this module; padt's own API (`PaDTProcessor`, `parse_completion`, `PaDTPredictor`, `VRTImageState`)
never uses it.
"""

from __future__ import annotations

# ============================================================================ processing (VisonTextProcessingClass)

# ============================================================================ parsing (parseVRTintoCompletion)

# ============================================================================ model (is_main, past_*, embed_tokens)

# ============================================================================ training logs (the authors' loss names)
