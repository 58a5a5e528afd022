"""A tiny random exported model for evaluation tests (built in memory, nothing downloaded)."""

from pathlib import Path

import pytest
import torch

from mmalign.model import build_model, export, image_processor_for


@pytest.fixture
def tiny_model(tiny_spec):
    torch.manual_seed(0)
    return build_model(tiny_spec("minigpt4_patch"))


@pytest.fixture
def tiny_dir(tiny_model, tmp_path) -> Path:
    model, tok = tiny_model
    out = tmp_path / "tiny_model"
    export(model, tok, out, image_processor=image_processor_for(model), template="minigpt4_v0")
    return out
