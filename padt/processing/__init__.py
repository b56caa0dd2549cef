"""Text side of PaDT: VRT id arithmetic (`vrt`), the processors (`processor`), completion parsing (`parsing`) and
generation helpers (`generation`).

The processor module's names are re-exported here, so the drop-ins documented in the README keep their import path:
`from padt.processing import process_vision_info, smart_resize, build_qwen_processor, ...`.
"""

from padt.processing.processor import *  # noqa: F401,F403
