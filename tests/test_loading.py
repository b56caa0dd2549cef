"""Loading a model or processor from a path fails clearly, early and never silently (`padt.model.loading`)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from padt.model.backbones import padt_classes_for
from padt.model.backbones.qwen2_5_vl import PaDTForConditionalGeneration
from padt.model.loading import CheckpointError, looks_local, resolve_source
from padt.processing.processor import PaDTProcessor
from padt.testing.models import build_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture
def ckpt(tiny_dir, tmp_path) -> Path:
    """A fresh copy of the tiny checkpoint, to damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))


def _rewrite_weights(folder: Path, drop) -> None:
    sd = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if not drop(k)}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


# ---------------------------------------------------------------- 1. missing config / weights / processor files
def test_folder_without_config_json_names_it_before_building(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        padt_classes_for(ckpt)
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        PaDTForConditionalGeneration.from_pretrained(ckpt)


def test_folder_with_config_but_no_weights_names_them(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no weights: expected one of model\.safetensors"):
        PaDTForConditionalGeneration.from_pretrained(ckpt)


@pytest.mark.parametrize(("remove", "match"), [
    (("tokenizer.json",), r"has no tokenizer files \(expected one of tokenizer\.json"),
    (("processor_config.json",), r"has no image processor config"),
])
def test_processor_folder_missing_files_names_them(ckpt, remove, match):
    for name in remove:
        (ckpt / name).unlink()
    with pytest.raises(FileNotFoundError, match=match):
        PaDTProcessor.from_pretrained(ckpt)


def test_processor_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such processor folder"):
        PaDTProcessor.from_pretrained(tmp_path / "nope")


# ---------------------------------------------------------------- 2. missing local paths and offline hub ids
@pytest.mark.parametrize("path", ["runs/x/final", "./runs/x", "/nonexistent/ckpt", "~/no-such-padt-ckpt"])
def test_missing_local_path_fails_at_once(path):
    assert looks_local(path)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        padt_classes_for(path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        PaDTForConditionalGeneration.from_pretrained(path)
    assert time.monotonic() - start < 5, "no hub retries"


def test_hub_id_not_reachable_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not looks_local("someorg/some-padt-model")
    with pytest.raises(FileNotFoundError, match="cannot be reached offline"):
        padt_classes_for("someorg/some-padt-model", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cannot be reached offline"):
        resolve_source("someorg/some-padt-model", cache_dir=str(tmp_path))


def test_hub_id_online_is_left_to_the_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_source("someorg/some-padt-model") is None


def test_train_processor_loader_fails_at_once_on_missing_path(tmp_path):
    from types import SimpleNamespace

    from padt.train.build import load_padt_processor

    args = SimpleNamespace(processor_name_or_path=None, model_name_or_path=str(tmp_path / "runs" / "x"),
                           min_pixels=3136, max_pixels=12845056)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_padt_processor(args, vrt_base_id=320)


# ---------------------------------------------------------------- 3. truncated safetensors
def test_truncated_safetensors_names_the_file(ckpt):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{file}.* is truncated or corrupt") as err:
        PaDTForConditionalGeneration.from_pretrained(ckpt)
    assert err.value.__cause__ is None and err.value.__suppress_context__


# ---------------------------------------------------------------- 4. missing backbone weights
def test_missing_llm_weights_are_refused_unless_allowed(ckpt):
    _rewrite_weights(ckpt, lambda k: k == "lm_head.weight" or k.startswith("model.layers.0.mlp."))
    with pytest.raises(ValueError, match=r"lacks 4 backbone weights: lm_head\.weight, "
                                         r"model\.language_model\.layers\.0\.mlp\.down_proj\.weight"):
        PaDTForConditionalGeneration.from_pretrained(ckpt)
    model = PaDTForConditionalGeneration.from_pretrained(ckpt, allow_missing_weights=True)
    assert model.lm_head.weight.shape[0] == model.config.vrt_base_id


def test_missing_vision_weights_are_refused(ckpt):
    _rewrite_weights(ckpt, lambda k: k.startswith("visual.merger."))
    with pytest.raises(ValueError, match=r"backbone weights: model\.visual\.merger\."):
        PaDTForConditionalGeneration.from_pretrained(ckpt)


def test_tied_embeddings_without_lm_head_load(tmp_path):
    folder = build_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    _rewrite_weights(folder, lambda k: k == "lm_head.weight")
    model = PaDTForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


# ---------------------------------------------------------------- 5. another backbone family
def _llava(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llava"
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_other_model_type_names_it_and_the_supported_ones(ckpt):
    _llava(ckpt)
    with pytest.raises(CheckpointError, match=r"model_type='llava'; supported: \['qwen2_5_vl'\]"):
        padt_classes_for(ckpt)


def test_predictor_surfaces_the_backbone_error_unchained(ckpt):
    from padt.inference.predictor import PaDTPredictor

    _llava(ckpt)
    with pytest.raises(ValueError, match=r"model_type='llava'") as err:
        PaDTPredictor.from_pretrained(ckpt, device="cpu")
    assert err.value.__cause__ is None and err.value.__context__ is None


# ---------------------------------------------------------------- the training CLI: one line, exit code 2
@pytest.mark.parametrize("damage", ["llava", "missing", "no_config"])
def test_train_cli_reports_a_bad_model_in_one_line(ckpt, tmp_path, capsys, damage):
    from padt.train.run import main

    model = ckpt
    if damage == "llava":
        _llava(ckpt)
    elif damage == "missing":
        model = tmp_path / "runs" / "x"
    else:
        (ckpt / "config.json").unlink()
    data = tmp_path / "data.jsonl"
    data.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", str(model), "--data_file_paths", str(data), "--image_folders", str(tmp_path),
              "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("python -m padt.train: error:")]
    want = {"llava": "model_type='llava'", "missing": "no such folder", "no_config": "has no config.json"}[damage]
    assert len(lines) == 1 and want in lines[0], err
