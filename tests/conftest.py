"""Shared fixtures: the authors' reference outputs (oracle) and tiny random PaDT models built in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
ORACLE_DIR = FIXTURES / "oracle_ref"


@pytest.fixture(scope="session")
def oracle_io() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ORACLE_DIR / "io.safetensors"))


@pytest.fixture(scope="session")
def oracle_model():
    from padt import PaDTForConditionalGeneration

    return PaDTForConditionalGeneration.from_pretrained(str(ORACLE_DIR / "model"), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def oracle_forward(oracle_model, oracle_io):
    with torch.no_grad():
        return oracle_model(
            input_ids=oracle_io["inputs.input_ids"],
            attention_mask=oracle_io["inputs.attention_mask"],
            pixel_values=oracle_io["inputs.pixel_values"],
            image_grid_thw=oracle_io["inputs.image_grid_thw"],
            output_hidden_states=True,
            use_cache=False,
        )


def close(got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    """|got - ref| <= atol + rtol |ref| elementwise, with the -inf pattern identical."""
    got, ref = got.float(), ref.float()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), "-inf pattern differs"
    fin = torch.isfinite(ref)
    err = (got[fin] - ref[fin]).abs()
    tol = atol + rtol * ref[fin].abs()
    assert bool((err <= tol).all()), f"max abs err {err.max().item():.3g} (worst excess {(err - tol).max().item():.3g})"


@pytest.fixture
def tiny_config():
    from padt.testing.models import tiny_padt_config

    return tiny_padt_config()


def make_tiny_model(**overrides):
    from padt import PaDTForConditionalGeneration
    from padt.testing.models import tiny_padt_config

    torch.manual_seed(0)
    model = PaDTForConditionalGeneration(tiny_padt_config(**overrides)).eval()
    # random (non-zero) prototype norm so that VRT rows are informative in tests
    with torch.no_grad():
        model.vis_norm.weight.normal_(1.0, 0.1)
        model.vis_norm.bias.normal_(0.0, 0.1)
    return model


@pytest.fixture
def tiny_model():
    return make_tiny_model()
