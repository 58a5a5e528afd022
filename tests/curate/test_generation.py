"""The describe step's batched two-turn generation answers as a ChatSession does, turn by turn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.chat.session import ChatSession
from mmalign.curate.generation import continue_batch, first_batch
from mmalign.data import toyworld as tw
from mmalign.model import LoadedModel, build_model
from mmalign.recipes import get_recipe

PROMPT = "Describe this image in detail. Give as many details as possible. Say everything you see."


def loaded_for(arch: str, tiny_spec) -> LoadedModel:
    """A model whose answers depend on the image: a random projection with large weights."""
    torch.manual_seed(0)
    if arch == "toy":
        recipe = get_recipe("toy-minigpt4")
        model, tok = build_model(recipe.spec)
        template = recipe.template
    else:
        model, tok = build_model(tiny_spec(arch))
        template = "minigpt4_v0" if arch != "llava" else "vicuna_v1"
    for name, p in model.named_parameters():
        if "projector" in name or "language_projection" in name or "qformer" in name:
            p.data.normal_(0, 0.5)
    return LoadedModel.of(model, tok, template, name=arch)


def images_for(loaded: LoadedModel, n: int) -> list[Image.Image]:
    """Toy scenes for the toy model; random pixels for the tiny random towers (32 px)."""
    size = loaded.model.config.vision_config.image_size
    if size == tw.IMAGE_SIZE:
        return [tw.render(tw.make_scene(s)) for s in range(n)]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def session_answers(loaded: LoadedModel, image, gen: dict, follow_up: str) -> tuple[str, str]:
    s = ChatSession(loaded, system=None)
    s.set_image(image)
    first = "".join(s.ask(PROMPT, **gen)).strip()
    return first, "".join(s.ask(follow_up, **gen)).strip()


@pytest.mark.parametrize("arch", ["toy", "minigpt4", "llava"])
def test_continue_on_the_cache_gives_the_sessions_greedy_answers(arch, tiny_spec):
    loaded = loaded_for(arch, tiny_spec)
    images = images_for(loaded, 5)
    gen = {"max_new_tokens": 12, "do_sample": False, "num_beams": 1}
    first = first_batch(loaded, images, PROMPT, None, gen)
    todo = [0, 2, 3, 4]  # not every row: the cache is cut to the rows that continue
    second = continue_batch(loaded, first, todo, "Continue", gen)
    for k, i in enumerate(todo):
        want_first, want_second = session_answers(loaded, images[i], gen, "Continue")
        assert first.rows[i].text == want_first
        assert second[k] == want_second, (arch, i)
    # the answers differ from row to row, so a mix-up of rows would show
    assert len({r.text for r in first.rows}) > 1 or len(set(second)) > 1


def test_beam_search_continues_by_re_encoding(tiny_spec):
    loaded = loaded_for("toy", tiny_spec)
    images = [tw.render(tw.make_scene(s)) for s in range(2)]
    gen = {"max_new_tokens": 8, "do_sample": False, "num_beams": 2}
    first = first_batch(loaded, images, PROMPT, None, gen)
    assert first.cache is None
    second = continue_batch(loaded, first, [1], "Continue", gen)
    assert second == [session_answers(loaded, images[1], gen, "Continue")[1]]
