"""ChatSession on a tiny random model: streaming, stop strings, turns, image handling."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

import mmalign.chat.session as session_mod
from mmalign.chat.generate import generate_batch
from mmalign.chat.session import ChatSession
from mmalign.model import LoadedModel, build_model, num_image_tokens
from mmalign.prompts import cut_at_stop, encode_user_turn, get_template, stop_prefix_len, user_with_image
from mmalign.recipes import get_recipe

TEMPLATE = "minigpt4_v0"
MARKER = get_template(TEMPLATE).image_marker  # "<Img><ImageHere></Img>"


@pytest.fixture
def tiny(tiny_spec):
    torch.manual_seed(0)
    return build_model(tiny_spec("minigpt4_patch"))


@pytest.fixture
def session(tiny):
    model, tok = tiny
    return ChatSession(LoadedModel.of(model, tok, TEMPLATE))


@pytest.fixture
def calls(session, monkeypatch):
    """Record the inputs of every `model.generate` call (the real generate still runs)."""
    seen: list[dict] = []
    real = session.model.generate

    def spy(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(session.model, "generate", spy)
    return seen


def red() -> Image.Image:
    return Image.new("RGB", (40, 30), (200, 20, 20))


def n_image_tokens(ids: torch.Tensor, model) -> int:
    return int((ids == model.config.image_token_index).sum())


def test_stream_joins_to_the_recorded_answer_and_matches_batch_generation(session, calls):
    session.set_image(red())
    pieces = list(session.ask("What color is the circle?", max_new_tokens=12))

    assert len(session.turns) == 2 and session.turns[1]["role"] == "assistant"
    answer = session.turns[1]["content"]
    assert "".join(pieces).strip() == answer
    assert all(pieces) and "###" not in "".join(pieces)
    (call,) = calls
    model = session.model
    # the same greedy answer as batch generation from the same prompt
    want = generate_batch(
        session.loaded,
        [(session.image, session.turns[:1])],
        system=session.system,
        max_new_tokens=12,
    )
    assert answer == want[0]
    assert call["pixel_values"].shape == (1, 3, 32, 32)
    assert n_image_tokens(call["input_ids"], model) == num_image_tokens(model.config)
    assert call["do_sample"] is False and call["max_new_tokens"] == 12 and "streamer" in call


def test_multi_turn_marks_the_image_only_in_the_first_user_turn(session, calls):
    session.set_image(red())
    list(session.ask("What is this?", max_new_tokens=4))
    list(session.ask("And the color?", max_new_tokens=4))

    roles = [t["role"] for t in session.turns]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert session.turns[0]["content"] == f"{MARKER} What is this?"
    assert session.turns[2]["content"] == "And the color?"
    assert sum(t["content"].count("<ImageHere>") for t in session.turns) == 1
    n = num_image_tokens(session.model.config)
    first, second = calls[0]["input_ids"][0], calls[1]["input_ids"][0]
    assert n_image_tokens(first, session.model) == n_image_tokens(second, session.model) == n
    assert "pixel_values" not in calls[1]  # the image's features are in the cache already
    assert len(second) > len(first) and torch.equal(second[: len(first)], first)  # history is a prefix


def test_set_image_starts_a_new_conversation(session, calls):
    session.set_image(red())
    list(session.ask("What is this?", max_new_tokens=3))
    blue = Image.new("L", (32, 32), 90)  # grey-scale input is converted
    session.set_image(blue)
    assert session.turns == [] and session.image.mode == "RGB"

    list(session.ask("Describe it.", max_new_tokens=3))
    assert session.turns[0]["content"] == f"{MARKER} Describe it."
    assert len(session.turns) == 2
    expect = session.image_transform(session.image)[None]
    assert torch.equal(calls[-1]["pixel_values"], expect)

    session.reset()
    assert session.turns == [] and session.image is None


def test_text_only_chat_has_no_image_tokens(session, calls):
    list(session.ask("How many shapes are there?", max_new_tokens=3))
    assert session.turns[0]["content"] == "How many shapes are there?"
    assert "pixel_values" not in calls[0]
    assert n_image_tokens(calls[0]["input_ids"], session.model) == 0


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_message_raises(session, text):
    session.set_image(red())
    with pytest.raises(ValueError, match="empty"):
        list(session.ask(text))
    assert session.turns == []


def test_over_long_conversation_raises_and_keeps_the_turns(tiny):
    model, tok = tiny
    s = ChatSession(LoadedModel.of(model, tok, TEMPLATE), max_context=10)
    s.set_image(red())
    with pytest.raises(ValueError, match="max_context"):
        list(s.ask("Describe this image in detail."))
    assert s.turns == []


def test_max_context_leaves_room_for_the_answer(tiny):
    model, tok = tiny
    t = get_template(TEMPLATE)
    prompt = encode_user_turn(
        tok, t, user_with_image(t, "Hi."), num_image_tokens(model.config), first=True, system=t.system
    )
    s = ChatSession(LoadedModel.of(model, tok, TEMPLATE), max_context=len(prompt) + 4)
    s.set_image(red())
    with pytest.raises(ValueError, match="max_new_tokens=5, over max_context"):  # the prompt alone fits
        list(s.ask("Hi.", max_new_tokens=5))
    assert s.turns == []
    list(s.ask("Hi.", max_new_tokens=4))
    assert [t["role"] for t in s.turns] == ["user", "assistant"]


def test_an_abandoned_stream_stops_generating(tiny):
    """Closing ask() early ends generate at its next step, not after max_new_tokens."""
    model, tok = tiny
    token = tok.encode(" a", add_special_tokens=False)[-1]
    steps = []

    def endless(module, args, out):  # never a stop token, so only max_new_tokens would end it
        steps.append(1)
        forced = torch.full_like(out, -1e4)
        forced[..., token] = 0
        return forced

    hook = model.get_output_embeddings().register_forward_hook(endless)
    try:
        s = ChatSession(LoadedModel.of(model, tok, TEMPLATE), max_context=10_000)
        s.set_image(red())
        answer = s.ask("Describe it.", max_new_tokens=400)
        assert next(answer).strip()
        answer.close()  # joins the generating thread
    finally:
        hook.remove()
    assert len(steps) < 100
    assert s.turns == []  # no answer joined the conversation


class ScriptedStreamer:
    """Stands in for TextIteratorStreamer: yields SCRIPT as the decoded pieces."""

    SCRIPT: list[str] = []

    def __init__(self, *args, **kwargs):
        pass

    def __iter__(self):
        return iter(list(self.SCRIPT))

    def end(self):
        pass


@pytest.mark.parametrize(
    "script, shown, answer",
    [
        (["abc", "#", "#", "#", "def"], ["abc"], "abc"),  # a stop split over pieces never shows
        (["abc", "#", "#", "x", " more"], ["abc", "##x", " more"], "abc##x more"),  # a false alarm is released
        (["The circle.###Human: ", "what"], ["The circle."], "The circle."),
        ([" red ", "#"], [" red ", "#"], "red #"),  # a held tail is shown at the end
    ],
)
def test_stop_string_is_cut_while_streaming(session, monkeypatch, script, shown, answer):
    monkeypatch.setattr(session_mod, "TextIteratorStreamer", ScriptedStreamer)
    monkeypatch.setattr(ScriptedStreamer, "SCRIPT", script)
    monkeypatch.setattr(session.model, "generate", lambda **kw: None)
    session.set_image(red())
    assert list(session.ask("hi")) == shown
    assert session.turns[-1] == {"role": "assistant", "content": answer}


def _consume(gen, timeout: float = 30.0):
    """Drain `gen` in a thread so a hang fails the test instead of blocking the suite."""
    out: dict = {}

    def run():
        try:
            out["pieces"] = list(gen)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "ask() hung"
    return out


def test_generation_error_is_raised_not_hung(session, monkeypatch):
    def boom(**kwargs):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(session.model, "generate", boom)
    session.set_image(red())
    out = _consume(session.ask("hi"))
    assert isinstance(out.get("error"), RuntimeError)
    assert session.turns == []  # the failed question is not left dangling


def test_beam_search_answers_in_one_piece(session):
    # transformers refuses to stream beam search; the chat (`--num-beams`) must still answer
    session.set_image(red())
    out = _consume(session.ask("What is this?", num_beams=2, max_new_tokens=5))
    assert "error" not in out, out.get("error")
    assert len(out["pieces"]) <= 1
    assert "".join(out["pieces"]).strip() == session.turns[-1]["content"]
    want = generate_batch(
        session.loaded,
        [(session.image, session.turns[:1])],
        system=session.system,
        num_beams=2,
        max_new_tokens=5,
    )
    assert session.turns[-1]["content"] == want[0]


@pytest.mark.parametrize(
    "text, cut",
    [
        ("abc###def", ("abc", True)),
        ("abc", ("abc", False)),
        ("###", ("", True)),
        ("a##b###c###", ("a##b", True)),
        ("abc##", ("abc##", False)),
    ],
)
def testcut_at_stop(text, cut):
    assert cut_at_stop(text, ("###",)) == cut


def test_cut_at_stop_takes_the_earliest_of_several_stops():
    assert cut_at_stop("ab</s>cd###", ("###", "</s>")) == ("ab", True)


@pytest.mark.parametrize(
    "text, hold",
    [("abc#", 1), ("abc##", 2), ("abc", 0), ("", 0), ("#a", 0), ("abc# ", 0)],
)
def teststop_prefix_len(text, hold):
    assert stop_prefix_len(text, ("###",)) == hold


def test_stop_prefix_len_longest_over_stops():
    assert stop_prefix_len("ok</s", ("###", "</s>")) == 3
    assert stop_prefix_len("ok<", ("###", "</s>")) == 1


# --------------------------------------------------------------------------- KV cache reuse

QUESTIONS = ["What is this?", "And the color?", "How many shapes are there?", "Describe this image in detail."]


def _chat(session, image_turns: dict[int, Image.Image], **gen) -> list[str]:
    answers = []
    for i, q in enumerate(QUESTIONS):
        if i in image_turns:
            session.add_image(image_turns[i])
        answers.append("".join(session.ask(q, max_new_tokens=6, **gen)))
    return answers


@pytest.mark.parametrize("arch", ["minigpt4_patch", "minigpt4", "llava", "toy-minigpt4"])
def test_kv_reuse_gives_the_same_greedy_answers_as_re_encoding(tiny_spec, arch):
    torch.manual_seed(0)
    model, tok = build_model(get_recipe(arch).spec if arch.startswith("toy") else tiny_spec(arch))
    blue = Image.new("RGB", (30, 40), (20, 20, 200))
    reuse = ChatSession(LoadedModel.of(model, tok, TEMPLATE))
    fresh = ChatSession(LoadedModel.of(model, tok, TEMPLATE), kv_reuse=False)
    images = {0: red(), 2: blue}  # a second image mid-conversation
    got, want = _chat(reuse, images), _chat(fresh, images)
    assert got == want and reuse.turns == fresh.turns and reuse.ids == fresh.ids
    if arch.startswith("toy"):  # the trained toy LLM answers each question differently
        assert len(set(got)) > 2, got
    assert sum(t["content"].count("<ImageHere>") for t in reuse.turns) == 2
    assert reuse._cached_images == 2 and fresh._cache is None


def test_later_turns_feed_only_new_tokens_and_new_images(session, calls):
    blue = Image.new("RGB", (30, 40), (20, 20, 200))
    session.set_image(red())
    list(session.ask("What is this?", max_new_tokens=5))
    after_first = list(session.ids)
    list(session.ask("And the color?", max_new_tokens=5))
    session.add_image(blue)
    list(session.ask("What about this one?", max_new_tokens=5))

    first, second, third = calls
    cache = first["cache"]
    assert second["cache"] is cache and third["cache"] is cache  # one cache for the whole conversation
    # the ids the model produced are kept as they were, the next user turn appended after them
    assert second["input_ids"][0, : len(after_first)].tolist() == after_first
    assert "pixel_values" not in second
    assert torch.equal(third["pixel_values"], session.image_transform(blue)[None])  # only the new image
    assert session.turns[4]["content"] == f"{MARKER} What about this one?"


def test_the_cache_holds_exactly_the_conversation_ids(session):
    """After each turn the cache is the model's keys for a prefix of `session.ids` (checked
    against a fresh forward of those ids and the image)."""
    session.set_image(red())
    for q in QUESTIONS[:3]:
        list(session.ask(q, max_new_tokens=7))
        n = session._cache.get_seq_length()
        assert len(session.ids) - 3 <= n <= len(session.ids)  # at most the uncached turn end
        ids = torch.tensor([session.ids[:n]])
        pixels = session.image_transform(session.image)[None]
        with torch.no_grad():
            ref = session.model(input_ids=ids, pixel_values=pixels, use_cache=True).past_key_values
        for layer, ref_layer in zip(session._cache.layers, ref.layers):
            assert torch.allclose(layer.keys, ref_layer.keys, atol=1e-5)
            assert torch.allclose(layer.values, ref_layer.values, atol=1e-5)


@pytest.mark.parametrize(
    "said, ids_tail",
    [
        (" a red circle", " a red circle###"),  # ran out of tokens: the turn end is added
        (" a red circle</s>", " a red circle###"),  # EOS instead of the template's stop: dropped
        (" a red circle###", " a red circle###"),  # a clean stop: kept as produced
    ],
)
def test_settle_ends_the_answer_with_the_turn_end(session, said, ids_tail):
    tok = session.tokenizer
    prompt = [5, 6, 7]
    generated = tok.encode(said, add_special_tokens=False)
    visible = cut_at_stop(tok.decode(generated, skip_special_tokens=True), ("###",))[0]
    session._settle(prompt, generated, visible)
    assert session.ids[:3] == prompt
    assert tok.decode(session.ids[3:]) == ids_tail
    if said.endswith("###"):
        assert session.ids[3:] == generated  # the model's own ids, not a re-tokenisation


def test_beam_search_re_encodes_and_the_next_turn_rebuilds_the_cache(session, calls):
    session.set_image(red())
    list(session.ask("What is this?", max_new_tokens=4))
    _consume(session.ask("And the color?", num_beams=2, max_new_tokens=4))
    list(session.ask("How many?", max_new_tokens=4))
    greedy1, beam, greedy2 = calls
    assert "cache" not in beam and "pixel_values" in beam  # the whole conversation, image included
    assert beam["input_ids"].shape[1] > greedy1["input_ids"].shape[1]
    assert greedy2["cache"] is not greedy1["cache"] and "pixel_values" in greedy2
    assert len(session.turns) == 6


def test_sampling_settings_reach_generate(session, calls):
    session.set_image(red())
    torch.manual_seed(1)
    list(session.ask("What is this?", do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=4))
    (call,) = calls
    assert call["do_sample"] is True and call["temperature"] == 0.7 and call["top_p"] == 0.9
    assert session.turns[-1]["role"] == "assistant"
