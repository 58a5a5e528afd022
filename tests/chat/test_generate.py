"""Batched generation: left padding must not change greedy answers; image-token counts checked."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmalign.chat.generate import generate_batch, generation_kwargs
from mmalign.model import LoadedModel, build_model, image_transform_for
from mmalign.prompts import get_template, user_with_image

TEMPLATE = "minigpt4_v0"


@pytest.fixture(params=["minigpt4_patch", "minigpt4"])
def tiny(request, tiny_spec):
    torch.manual_seed(0)
    return build_model(tiny_spec(request.param))


def _items(text_only: bool = True):
    """Prompts of different lengths, different images, one text-only, one two-turn."""
    img = lambda c: Image.new("RGB", (36, 28), c)  # noqa: E731
    q = lambda text: [{"role": "user", "content": user_with_image(TEMPLATE, text)}]  # noqa: E731
    items = [
        (img((200, 20, 20)), q("What is this?")),
        (img((20, 20, 200)), q("Please provide a detailed description of the picture. Could you describe it?")),
        (None, [{"role": "user", "content": "How many shapes are there?"}]),
        (img((20, 180, 20)), q("Describe this image in detail.")),
        (
            img((240, 220, 20)),
            [
                {"role": "user", "content": user_with_image(TEMPLATE, "What color is the circle?")},
                {"role": "assistant", "content": "It is red."},
                {"role": "user", "content": "And the square?"},
            ],
        ),
    ]
    return items if text_only else [it for it in items if it[0] is not None]


def test_batch_size_does_not_change_greedy_answers(tiny):
    model, tok = tiny
    items = _items(text_only=model.config.model_type != "blip-2")  # Blip2 cannot generate without an image
    one = generate_batch(LoadedModel.of(model, tok, TEMPLATE), items, batch_size=1, max_new_tokens=8)
    four = generate_batch(LoadedModel.of(model, tok, TEMPLATE), items, batch_size=4, max_new_tokens=8)
    assert len(one) == len(four) == len(items)
    assert four == one
    assert any(one) and len(set(one)) > 1  # real, prompt-dependent answers were compared
    assert all("###" not in a and a == a.strip() for a in one)


def test_answers_stop_at_the_stop_string(tiny, monkeypatch):
    model, tok = tiny
    stop_id = tok.encode("###", add_special_tokens=False)
    assert len(stop_id) == 1  # a single token: passed to generate as an extra EOS
    assert stop_id[0] in generation_kwargs(tok, get_template(TEMPLATE))["eos_token_id"]
    real = model.generate
    tail = tok.encode(" a red circle###Human: more", add_special_tokens=False)

    def scripted(**kwargs):  # as if the model had said " a red circle###Human: more"
        ids = kwargs["input_ids"]
        return torch.cat([ids, torch.tensor([tail] * len(ids))], dim=1)

    monkeypatch.setattr(model, "generate", scripted)
    out = generate_batch(LoadedModel.of(model, tok, TEMPLATE), _items()[:2])
    monkeypatch.setattr(model, "generate", real)
    assert out == ["a red circle", "a red circle"]


def test_greedy_defaults_and_sampling_overrides(tiny):
    _, tok = tiny
    t = get_template(TEMPLATE)
    kw = generation_kwargs(tok, t, temperature=0.7, top_p=0.5, max_new_tokens=None)
    assert kw["do_sample"] is False and "temperature" not in kw and "top_p" not in kw
    assert kw["max_new_tokens"] == 128 and tok.eos_token_id in kw["eos_token_id"]
    kw = generation_kwargs(tok, t, do_sample=True, temperature=0.7)
    assert kw["do_sample"] is True and kw["temperature"] == 0.7


def test_wrong_image_token_count_raises(tiny):
    model, tok = tiny
    loaded = LoadedModel.of(model, tok, TEMPLATE)
    red = Image.new("RGB", (32, 32), (200, 20, 20))
    no_marker = [{"role": "user", "content": "What is this?"}]
    with_marker = [{"role": "user", "content": user_with_image(TEMPLATE, "What is this?")}]
    with pytest.raises(ValueError, match="image tokens"):
        generate_batch(loaded, [(red, no_marker)], max_new_tokens=2)  # image, no tokens
    with pytest.raises(ValueError, match="image tokens"):
        generate_batch(loaded, [(None, with_marker)], max_new_tokens=2)  # tokens, no image
    with pytest.raises(ValueError, match="image tokens"):  # one row of a batch is enough
        generate_batch(loaded, [(red, with_marker), (red, no_marker)], max_new_tokens=2)


def _rows(model, tok, items, **kw):
    from mmalign.chat.generate import Row
    from mmalign.model import num_image_tokens
    from mmalign.prompts import build_generation_prompt

    transform = image_transform_for(model)
    n = num_image_tokens(model.config)
    return [
        Row(build_generation_prompt(tok, TEMPLATE, turns, n, system=None), [transform(im)] if im else [], **kw)
        for im, turns in items
    ]


def test_rows_in_one_batch_answer_as_they_do_alone(tiny):
    from mmalign.chat.generate import generate_rows

    model, tok = tiny
    items = _items(text_only=model.config.model_type != "blip-2")
    alone = []
    for i, row in enumerate(_rows(model, tok, items)):
        row.max_new_tokens = 3 + i
        generate_rows(LoadedModel.of(model, tok, TEMPLATE), [row])
        alone.append(row)
    streamed: dict[int, list[str]] = {i: [] for i in range(len(items))}
    rows = _rows(model, tok, items)
    for i, row in enumerate(rows):
        row.max_new_tokens = 3 + i
        row.on_text = streamed[i].append
    generate_rows(LoadedModel.of(model, tok, TEMPLATE), rows)
    assert [r.token_ids for r in rows] == [r.token_ids for r in alone]
    assert [r.text for r in rows] == [r.text for r in alone]
    assert all("".join(streamed[i]) == r.text for i, r in enumerate(rows))
    assert [len(r.token_ids) for r in rows] == [3 + i for i in range(len(rows))]  # each its own budget
    assert all(r.finish_reason == "length" for r in rows)
    # the same answers as generate_batch gives (stripped of the row budget's cut)
    want = generate_batch(LoadedModel.of(model, tok, TEMPLATE), items, max_new_tokens=3)
    assert [r.text.strip() for r in _run(model, tok, items, max_new_tokens=3)] == want


def test_static_kv_cache_answers_as_the_dynamic_one(tiny):
    """``mmalign serve --kv-cache static``: a preallocated cache per batch, the same greedy tokens
    for rows of different prompt lengths (left-padded), with and without images."""
    from mmalign.chat.generate import generate_rows

    model, tok = tiny
    items = _items(text_only=model.config.model_type != "blip-2")
    dynamic = _run(model, tok, items, max_new_tokens=6)
    rows = _rows(model, tok, items, max_new_tokens=6)
    generate_rows(LoadedModel.of(model, tok, TEMPLATE), rows, kv_cache="static")
    assert len({len(r.input_ids) for r in rows}) > 1
    assert [r.token_ids for r in rows] == [r.token_ids for r in dynamic]
    assert [r.text for r in rows] == [r.text for r in dynamic]


def _run(model, tok, items, **kw):
    from mmalign.chat.generate import generate_rows

    rows = _rows(model, tok, items, **kw)
    generate_rows(LoadedModel.of(model, tok, TEMPLATE), rows)
    return rows


def test_row_stop_strings_and_cancel(tiny):
    model, tok = tiny
    items = _items(text_only=False)[:2]
    full = _run(model, tok, items, max_new_tokens=8)
    text = full[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    rows = _rows(model, tok, items, max_new_tokens=8)
    rows[0].stop = (stop,)
    rows[1].cancelled.set()
    from mmalign.chat.generate import generate_rows

    generate_rows(LoadedModel.of(model, tok, TEMPLATE), rows)
    assert rows[0].text == text[: text.index(stop)] and rows[0].finish_reason == "stop"
    assert rows[1].finish_reason == "cancelled" and len(rows[1].token_ids) == 1
