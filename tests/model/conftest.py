"""Fixtures for model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def build(tiny_spec):
    """``build(arch, **spec_overrides) -> (model, tokenizer)``, seeded."""
    from mmalign.model import build_model

    def _build(arch: str, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return build_model(tiny_spec(arch, **overrides))

    return _build
