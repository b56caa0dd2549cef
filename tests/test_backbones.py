"""The backbone seam: one interface (padt.model.backbones.base), one module per backbone, dispatch by model_type."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from padt.model.backbones import BACKBONES, padt_classes_for
from padt.model.backbones.base import VisionLanguageBackbone
from padt.model.backbones.qwen2_5_vl import PaDTConfig, PaDTForConditionalGeneration
from padt.model.modeling import PaDTModelMixin
from padt.testing.models import tiny_padt_config

PADT = Path(__file__).resolve().parents[1] / "padt"
# the only modules that may name a backbone's transformers classes: the backbone modules themselves, the Qwen
# processor construction, and the tiny test stand-ins (which build one backbone's config)
BACKBONE_SPECIFIC = {"model/backbones", "processing/qwen.py", "testing"}


def test_dispatch_by_model_type_from_a_folder_and_from_a_config(tmp_path):
    config = tiny_padt_config()
    config.save_pretrained(tmp_path)
    assert padt_classes_for(tmp_path) == (PaDTConfig, PaDTForConditionalGeneration)
    assert padt_classes_for(str(tmp_path)) == (PaDTConfig, PaDTForConditionalGeneration)
    assert padt_classes_for(config) == (PaDTConfig, PaDTForConditionalGeneration)
    assert set(BACKBONES) == {"qwen2_5_vl"}


def test_unknown_backbone_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match=r"no PaDT backbone for model_type='llava'; supported: \['qwen2_5_vl'\]"):
        padt_classes_for(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no model_type"):
        padt_classes_for(tmp_path)


def test_the_qwen_model_is_the_mixin_in_front_of_transformers_class():
    mro = PaDTForConditionalGeneration.__mro__
    assert mro.index(PaDTModelMixin) < mro.index(VisionLanguageBackbone) < [c.__name__ for c in mro].index(
        "Qwen2_5_VLForConditionalGeneration"
    )
    # every hook is overridden by the backbone module, except the two with a generic default
    for hook in ("encode_vision", "run_language_model", "manual_decode_position_ids", "output_rope_deltas"):
        assert getattr(PaDTForConditionalGeneration, hook) is not getattr(VisionLanguageBackbone, hook), hook


def test_an_unimplemented_hook_says_which():
    class Half(VisionLanguageBackbone):
        pass

    with pytest.raises(NotImplementedError, match="Half does not implement encode_vision"):
        Half().encode_vision(torch.zeros(1, 1), torch.ones(1, 3, dtype=torch.long))


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_only_backbone_modules_import_a_backbone():
    offenders = []
    for path in sorted(PADT.rglob("*.py")):
        rel = path.relative_to(PADT).as_posix()
        if any(rel == b or rel.startswith(b + "/") for b in BACKBONE_SPECIFIC):
            continue
        for module in _imported_modules(path):
            if module.startswith("transformers.models.") or (
                module.startswith("padt.model.backbones.") and module != "padt.model.backbones.base"
            ):
                offenders.append(f"{rel}: {module}")
    assert not offenders, offenders
