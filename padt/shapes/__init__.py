"""The synthetic shapes benchmark (not part of PaDT itself): scenes of coloured shapes with exact boxes and masks in
the released JSONL format, and the from-scratch training aids its tiny model uses (stage-0 vision pretraining,
`padt.shapes.vision_pretrain`, and the cell-class auxiliary loss, `padt.shapes.cell_class_loss`). See docs/shapes.md.

Modules, in pipeline order: `options` (vocabulary, `ShapesConfig`) -> `expressions` (referring expressions) ->
`scenes` (painter, sampling, rendering) -> `records` (JSONL records, COCO entries) -> `writing` (files, splits,
manifest). The names below are imported lazily (PEP 562), so `import padt.shapes` loads neither PIL nor numpy.
"""

from __future__ import annotations

from padt._lazy import lazy_exports

_EXPORTS = {
    "BACKGROUNDS": "padt.shapes.options",
    "CELL_CLASS_SETS": "padt.shapes.options",
    "KINDS": "padt.shapes.options",
    "PALETTE": "padt.shapes.options",
    "PROMPT_ORDERS": "padt.shapes.options",
    "ShapesConfig": "padt.shapes.options",
    "cell_class_names": "padt.shapes.options",
    "Expression": "padt.shapes.expressions",
    "ObjectFacts": "padt.shapes.expressions",
    "describe": "padt.shapes.expressions",
    "parse_expression": "padt.shapes.expressions",
    "referents": "padt.shapes.expressions",
    "Scene": "padt.shapes.scenes",
    "SceneObject": "padt.shapes.scenes",
    "Shape": "padt.shapes.scenes",
    "paint_shape": "padt.shapes.scenes",
    "render_scene": "padt.shapes.scenes",
    "sample_scene": "padt.shapes.scenes",
    "caption": "padt.shapes.records",
    "coco_entries": "padt.shapes.records",
    "facts_from_coco": "padt.shapes.records",
    "ovd_record": "padt.shapes.records",
    "referring_records": "padt.shapes.records",
    "ric_record": "padt.shapes.records",
    "SPLIT_STREAMS": "padt.shapes.writing",
    "generate_dataset": "padt.shapes.writing",
    "generate_split": "padt.shapes.writing",
    "scene_rng": "padt.shapes.writing",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
