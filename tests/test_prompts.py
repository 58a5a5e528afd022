import random

import pytest

from mmalign.prompts import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    MINIGPT4_INSTRUCTIONS,
    TEMPLATES,
    build_generation_prompt,
    clean_caption,
    encode_caption,
    encode_conversation,
    get_template,
    image_token_id,
    sample_instruction,
    stop_token_ids,
    strip_stop,
    user_with_image,
)

CHAT = ["minigpt4_v0", "llama2", "vicuna_v1"]
N = 3  # image tokens per image


def conv(name, n_turns):
    t = get_template(name)
    qs = ["Describe this image in detail.", "What color is the circle?", "How many shapes?"]
    ans = ["a red circle above a blue square.", "It is red.", "There are three shapes."]
    turns = []
    for i in range(n_turns):
        q = user_with_image(t, qs[i]) if i == 0 else qs[i]
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": ans[i]}]
    return turns


def learned_text(tok, enc):
    return tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("name", CHAT)
@pytest.mark.parametrize("n_turns", [1, 3])
@pytest.mark.parametrize("system", [None, "default"])
def test_label_mask_is_exactly_answers_plus_turn_end(tiny_tokenizer, name, n_turns, system):
    t = get_template(name)
    turns = conv(name, n_turns)
    kw = {} if system == "default" else {"system": None}
    enc = encode_conversation(tiny_tokenizer, name, turns, N, **kw)
    want = "".join(t.answer_prefix + x["content"] + t.turn_end for x in turns[1::2])
    assert learned_text(tiny_tokenizer, enc) == want
    assert len(enc["input_ids"]) == len(enc["labels"])
    # learned tokens are exactly where the ids are (labels == ids or -100, no shift)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(enc["input_ids"], enc["labels"]))
    assert enc["num_images"] == 1 and not enc["truncated"] and enc["answer_tokens_cut"] == 0


@pytest.mark.parametrize("fmt", ["minigpt4_caption", "plain"])
def test_caption_formats(tiny_tokenizer, fmt):
    tok = tiny_tokenizer
    enc = encode_caption(tok, "a red circle", 4, fmt=fmt)
    img = image_token_id(tok)
    assert enc["input_ids"][:5] == [tok.bos_token_id] + [img] * 4
    assert learned_text(tok, enc) == "a red circle\n"
    assert enc["labels"][:5] == [IGNORE_INDEX] * 5
    assert tok.decode(enc["input_ids"]) == "<s>" + IMAGE_TOKEN * 4 + "a red circle\n"


def render(tok, enc):
    return tok.decode(enc["input_ids"])


def test_rendered_text_matches_published_formats(tiny_tokenizer):
    tok, img = tiny_tokenizer, IMAGE_TOKEN * N
    one = lambda name: conv(name, 1)  # noqa: E731
    enc = encode_conversation(tok, "minigpt4_v0", one("minigpt4_v0"), N, system=None)
    assert render(tok, enc) == (
        f"<s>###Human: <Img>{img}</Img> Describe this image in detail. ###Assistant: "
        "a red circle above a blue square.###"
    )
    enc = encode_conversation(tok, "minigpt4_v0", conv("minigpt4_v0", 2), N)
    assert render(tok, enc) == (
        "<s>Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
        "once I provide it to you. Please answer my questions."
        f"###Human: <Img>{img}</Img> Describe this image in detail. ###Assistant: "
        "a red circle above a blue square.###Human: What color is the circle? ###Assistant: It is red.###"
    )
    enc = encode_conversation(tok, "llama2", conv("llama2", 2), N, system=None)
    assert render(tok, enc) == (
        f"<s>[INST] <Img>{img}</Img> Describe this image in detail. [/INST] "
        "a red circle above a blue square.</s><s>[INST] What color is the circle? [/INST] It is red.</s>"
    )
    enc = encode_conversation(tok, "llama2", one("llama2"), N, system="Be brief.")
    assert render(tok, enc).startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<Img>")
    enc = encode_conversation(tok, "vicuna_v1", conv("vicuna_v1", 2), N)
    assert render(tok, enc) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. "
        f"USER: {img}\nDescribe this image in detail. ASSISTANT: a red circle above a blue square.</s>"
        "USER: What color is the circle? ASSISTANT: It is red.</s>"
    )


@pytest.mark.parametrize("name", CHAT)
def test_image_tokens_expanded_in_place(tiny_tokenizer, name):
    tok = tiny_tokenizer
    enc = encode_conversation(tok, name, conv(name, 2), 5)
    ids, img = enc["input_ids"], image_token_id(tok)
    pos = [i for i, x in enumerate(ids) if x == img]
    assert len(pos) == 5 and pos == list(range(pos[0], pos[0] + 5))  # one contiguous block
    before, after = tok.decode(ids[: pos[0]]), tok.decode(ids[pos[-1] + 1 :])
    if name.startswith("minigpt4") or name == "llama2":
        assert before.endswith("<Img>") and after.startswith("</Img> Describe")
    else:
        assert before.endswith("USER: ") and after.startswith("\nDescribe")
    end = {"minigpt4_v0": "###Assistant: ", "llama2": "[/INST] ", "vicuna_v1": "ASSISTANT:"}[name]
    assert tok.decode(build_generation_prompt(tok, name, conv(name, 1)[:1], 5)).endswith(end)
    assert pos[0] > 1  # not prepended before the prompt


@pytest.mark.parametrize("name", CHAT)
@pytest.mark.parametrize("system", [None, "default"])
def test_generation_prompt_is_training_prefix(tiny_tokenizer, name, system):
    tok = tiny_tokenizer
    kw = {} if system == "default" else {"system": None}
    full = conv(name, 3)
    for k in range(1, 4):  # prompt for the k-th answer
        turns = full[: 2 * k]
        train = encode_conversation(tok, name, turns, N, **kw)
        gen = build_generation_prompt(tok, name, turns[:-1], N, **kw)
        assert train["input_ids"][: len(gen)] == gen
        tail = train["labels"][len(gen) :]
        assert all(lab != IGNORE_INDEX for lab in tail)  # everything after the prompt is learned
        t = get_template(name)
        answer = t.answer_prefix + turns[-1]["content"] + t.turn_end
        assert tok.decode(train["input_ids"][len(gen) :]) == answer


def test_generation_prompt_needs_user_last(tiny_tokenizer):
    with pytest.raises(ValueError, match="end with a user"):
        build_generation_prompt(tiny_tokenizer, "vicuna_v1", conv("vicuna_v1", 1), N)


def test_no_answer_and_bad_turns_raise(tiny_tokenizer):
    tok = tiny_tokenizer
    user = {"role": "user", "content": user_with_image("vicuna_v1", "hi")}
    with pytest.raises(ValueError, match="no assistant answer"):
        encode_conversation(tok, "vicuna_v1", [user], N)
    with pytest.raises(ValueError, match="no assistant answer"):
        encode_conversation(tok, "vicuna_v1", [], N)
    with pytest.raises(ValueError, match="empty assistant answer"):
        encode_conversation(tok, "vicuna_v1", [user, {"role": "assistant", "content": "  "}], N)
    with pytest.raises(ValueError, match="alternate"):
        encode_conversation(tok, "vicuna_v1", [user, user], N)
    with pytest.raises(ValueError, match="alternate"):
        encode_conversation(tok, "vicuna_v1", [{"role": "assistant", "content": "x"}], N)


def test_trailing_user_turn_is_dropped(tiny_tokenizer):
    turns = conv("vicuna_v1", 1)
    a = encode_conversation(tiny_tokenizer, "vicuna_v1", turns, N)
    b = encode_conversation(tiny_tokenizer, "vicuna_v1", turns + [{"role": "user", "content": "more?"}], N)
    assert a["input_ids"] == b["input_ids"]


def test_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    turns = conv("minigpt4_v0", 2)
    full = encode_conversation(tok, "minigpt4_v0", turns, N, system=None)
    n = len(full["input_ids"])
    same = encode_conversation(tok, "minigpt4_v0", turns, N, system=None, max_length=n)
    assert same["input_ids"] == full["input_ids"] and not same["truncated"]
    cut = encode_conversation(tok, "minigpt4_v0", turns, N, system=None, max_length=n - 2)
    assert cut["truncated"] and cut["answer_tokens_cut"] == 2
    assert cut["input_ids"] == full["input_ids"][: n - 2] and cut["labels"] == full["labels"][: n - 2]
    # the image would not fit
    first_img = full["input_ids"].index(image_token_id(tok))
    for m in (first_img, first_img + 1, first_img + N - 1):
        with pytest.raises(ValueError, match="image tokens would not fit"):
            encode_conversation(tok, "minigpt4_v0", turns, N, system=None, max_length=m)
    # only prompt left -> nothing to learn
    first_learned = next(i for i, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX)
    with pytest.raises(ValueError, match="cuts off every answer"):
        encode_conversation(tok, "minigpt4_v0", turns, N, system=None, max_length=first_learned)


def test_tokenizer_without_image_token(make_tiny_tokenizer):
    tok = make_tiny_tokenizer(image_token=False)
    with pytest.raises(ValueError, match="<image>"):
        encode_conversation(tok, "vicuna_v1", conv("vicuna_v1", 1), N)
    text_only = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    enc = encode_conversation(tok, "vicuna_v1", text_only, N)
    assert enc["num_images"] == 0


def test_text_only_and_stray_image_token(tiny_tokenizer):
    tok = tiny_tokenizer
    text_only = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    enc = encode_conversation(tok, "minigpt4_v0", text_only, N)
    assert image_token_id(tok) not in enc["input_ids"] and enc["num_images"] == 0
    stray = [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError, match="outside the template's placeholder"):
        encode_conversation(tok, "minigpt4_v0", stray, N)
    with pytest.raises(ValueError, match="num_image_tokens=0"):
        encode_conversation(tok, "vicuna_v1", conv("vicuna_v1", 1), 0)


def test_get_template_and_instructions():
    assert set(TEMPLATES) >= {"minigpt4_v0", "llama2", "vicuna_v1", "minigpt4_caption", "plain"}
    with pytest.raises(KeyError, match="known:.*minigpt4_v0"):
        get_template("nope")
    assert MINIGPT4_INSTRUCTIONS == (
        "Describe this image in detail.",
        "Take a look at this image and describe what you notice.",
        "Please provide a detailed description of the picture.",
        "Could you describe the contents of this image for me?",
    )
    rng = random.Random(0)
    seen = {sample_instruction(rng) for _ in range(200)}
    assert seen == {f"<Img><ImageHere></Img> {i}" for i in MINIGPT4_INSTRUCTIONS}
    assert sample_instruction(rng, None) in MINIGPT4_INSTRUCTIONS
    assert sample_instruction(rng, "vicuna_v1").startswith("<image>\n")


def test_clean_caption_and_strip_stop(tiny_tokenizer):
    assert clean_caption("A Dog, running!  (fast) on: the grass.") == "a dog, running fast on the grass"
    assert clean_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    assert strip_stop("A red circle.###Human: more", "minigpt4_v0") == "A red circle."
    assert strip_stop("A red circle.</s>junk", "vicuna_v1") == "A red circle."
    assert strip_stop("no stop here ", "llama2") == "no stop here"
    assert stop_token_ids(tiny_tokenizer, "vicuna_v1") == [tiny_tokenizer.eos_token_id]


@pytest.mark.parametrize("name", CHAT)
@pytest.mark.parametrize("system", ["default", "Be brief."])
def test_jinja_chat_template_renders_like_generation_prompt(tiny_tokenizer, name, system):
    """HF users' ``apply_chat_template`` gives the text of the ids mmalign builds (one image token)."""
    from mmalign.prompts import chat_template

    turns = conv(name, 2) + [{"role": "user", "content": "How many shapes?"}]
    kw = {} if system == "default" else {"system": system}
    ids = build_generation_prompt(tiny_tokenizer, name, turns, 1, **kw)
    qs = [
        turns[0]["content"].split(get_template(name).image_marker)[-1].strip(),
        turns[2]["content"],
        turns[4]["content"],
    ]
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qs[0]}]},
        {"role": "assistant", "content": turns[1]["content"]},
        {"role": "user", "content": qs[1]},
        {"role": "assistant", "content": turns[3]["content"]},
        {"role": "user", "content": qs[2]},
    ]
    if system != "default":
        msgs = [{"role": "system", "content": system}, *msgs]
    text = tiny_tokenizer.apply_chat_template(
        msgs, chat_template=chat_template(name), add_generation_prompt=True, tokenize=False
    )
    assert text == tiny_tokenizer.decode(ids)
    no_gen = tiny_tokenizer.apply_chat_template(msgs, chat_template=chat_template(name), tokenize=False)
    assert text == no_gen + get_template(name).assistant_prefix
    with pytest.raises(ValueError, match="caption format"):
        chat_template("plain")


def test_training_system_is_llava_s_for_vicuna_v1_and_none_for_minigpt4(tiny_tokenizer):
    from mmalign.data.sources import ConversationRecord, make_conversation_encoder
    from mmalign.prompts import VICUNA_SYSTEM, training_system

    assert training_system("vicuna_v1") == VICUNA_SYSTEM
    assert training_system("minigpt4_v0") is None and training_system("llama2") is None
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    for name, has_system in (("vicuna_v1", True), ("minigpt4_v0", False)):
        ids = make_conversation_encoder(tiny_tokenizer, name, 0)(ConversationRecord(image=None, turns=turns))[
            "input_ids"
        ]
        assert ("A chat between" in tiny_tokenizer.decode(ids)) == has_system


def _loops_over_message_content(jinja: str) -> bool:
    """vLLM's rule for the "openai" content format (``chat_utils._detect_content_format``), restated:
    some ``for`` loop iterates over ``<m>['content']`` where ``<m>`` is the target of a loop over
    ``messages`` or over a variable assigned from it (``set turns = messages[1:]``)."""
    from jinja2 import Environment, nodes

    def base_name(node):  # `messages`, `messages[1:]`, `messages | x` -> "messages"
        while isinstance(node, (nodes.Filter, nodes.Getitem)) and not (
            isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const)
        ):
            node = node.node
        return node.name if isinstance(node, nodes.Name) else None

    ast = Environment(extensions=["jinja2.ext.loopcontrols"]).parse(jinja)
    lists = {"messages"} | {a.target.name for a in ast.find_all(nodes.Assign) if base_name(a.node) == "messages"}
    items = {f.target.name for f in ast.find_all(nodes.For) if base_name(f.iter) in lists}
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        while isinstance(it, nodes.Filter):
            it = it.node
        if isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Const) and it.arg.value == "content":
            if isinstance(it.node, nodes.Name) and it.node.name in items:
                return True
    return False


@pytest.mark.parametrize("name", CHAT)
def test_jinja_chat_template_loops_over_the_content_parts(name):
    """So vLLM detects the "openai" content format and keeps the template's image marker."""
    from mmalign.prompts import chat_template

    assert _loops_over_message_content(chat_template(name))
    filtered = (
        "{%- for m in messages -%}{{- m['content'] | selectattr('type', 'equalto', 'text') | list -}}{%- endfor -%}"
    )
    assert not _loops_over_message_content(filtered)  # what the template did before: "string"
