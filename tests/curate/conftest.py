"""Fixtures for the curation tests: a toy model folder whose answers depend on the image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def toy_describer(seed: int = 0):
    """``toy-minigpt4`` from the shipped backbones with a random, large projection (an untrained
    one answers "one" to everything): deterministic answers that differ from image to image."""
    from mmalign.model import LoadedModel, build_model
    from mmalign.recipes import get_recipe

    torch.manual_seed(seed)
    recipe = get_recipe("toy-minigpt4")
    model, tok = build_model(recipe.spec)
    for name, p in model.named_parameters():
        if "projector" in name:
            p.data.normal_(0, 0.5)
    return LoadedModel.of(model, tok, recipe.template, name="toy-random")


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory) -> Path:
    """The same model exported as a folder (what `describe.model` names)."""
    from mmalign.model import export

    loaded = toy_describer()
    folder = tmp_path_factory.mktemp("toy-model")
    export(loaded.model, loaded.tokenizer, folder, template="minigpt4_v0")
    return folder


@pytest.fixture(scope="session")
def toy_images(tmp_path_factory) -> Path:
    """12 toy scenes as JPEG files, plus a corrupt one."""
    from mmalign.data import toyworld as tw

    folder = tmp_path_factory.mktemp("images")
    for seed in range(12):
        tw.render(tw.make_scene(seed)).save(folder / f"{seed:03d}.jpg", quality=95)
    (folder / "999_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return folder


def subprocess_env() -> dict[str, str]:
    """This checkout first on the path (the subprocess runs elsewhere), one thread per process."""
    repo = str(Path(__file__).resolve().parents[2])
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
    }
