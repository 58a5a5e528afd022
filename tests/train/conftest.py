"""Fixtures for training tests: tiny exported model folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.model import build_model, export, image_processor_for


@pytest.fixture
def model_dirs(tmp_path_factory, tiny_spec):
    """``model_dirs(arch)``: a tiny exported folder of ``arch``."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            model, tok = build_model(tiny_spec(arch))
            out = tmp_path_factory.mktemp(f"tiny_{arch}")
            export(model, tok, out, image_processor=image_processor_for(model), template="minigpt4_v0")
            made[arch] = out
        return made[arch]

    return get


@pytest.fixture
def model_dir(model_dirs) -> Path:
    """A tiny minigpt4_patch folder (32 px images -> 4 image tokens)."""
    return model_dirs("minigpt4_patch")
