"""Conversation templates (as data) and the one text -> (input_ids, labels) path.

Every id sequence is built by tokenizing SEGMENTS separately (``add_special_tokens=False``)
and concatenating them: prompt text, image tokens, answers. The label mask is then exact by
construction (no re-tokenize-and-count arithmetic that can disagree with the tokenizer, the
cause of LLaVA's silently masked "tokenization mismatch" samples), and a generation prompt is
by construction a prefix of the training ids for the same turns. The segmentation follows
MiniGPT-4, which tokenizes the prompt pieces around ``<ImageHere>`` and ``answer + end_sym``
separately.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IMAGE_TOKEN = "<image>"
"""The single special token that image features replace (``config.image_token_index``)."""

IGNORE_INDEX = -100

MINIGPT4_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
    "once I provide it to you. Please answer my questions."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)

MINIGPT4_INSTRUCTIONS: tuple[str, ...] = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)


@dataclass(frozen=True)
class Template:
    """A conversation format, as data.

    Rendering of turns (u1, a1), (u2, a2) with system message s::

        [BOS] sys(s) user_prefix u1 assistant_prefix | answer_prefix a1 turn_end | turn_sep
        user_prefix u2 assistant_prefix | answer_prefix a2 turn_end |

    where ``sys(s) = system_format.format(system=s)`` or ``no_system`` when s is None, placed
    after the first ``user_prefix`` when ``system_in_first_user`` (Llama-2 ``<<SYS>>``).
    Only the ``| ... |`` parts (answer + turn end) are learned. ``answer_prefix`` exists for
    the space after ``ASSISTANT:``: LLaVA's prompt ends without it and its first answer token
    carries it (``"▁The"``), which a separately tokenized " The" reproduces for SentencePiece
    and byte-level BPE alike. MiniGPT-4 instead ends its prompt with the space (kept, faithful).
    """

    name: str
    system: str | None = None  # default system message; callers may override or pass None
    train_system: bool = False  # the recipe trains and evaluates with `system` (LLaVA), not without (MiniGPT-4 stage 2)
    system_format: str = "{system}"
    no_system: str = ""
    system_in_first_user: bool = False
    user_prefix: str = ""
    assistant_prefix: str = ""  # generation prompts end here
    answer_prefix: str = ""  # learned, before each answer
    turn_end: str = ""  # learned after each answer: what the model must say to stop
    turn_sep: str = ""  # between a turn end and the next user prefix (not learned)
    stop: tuple[str, ...] = ()
    image_placeholder: str = IMAGE_TOKEN  # replaced IN PLACE by N image tokens
    image_marker: str = IMAGE_TOKEN  # how a user message shows the image
    image_marker_sep: str = "\n"  # between the marker and the question
    add_bos: bool = True
    chat: bool = True  # False: stage-1 caption format (no roles)


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        # MiniGPT-4 (Vicuna v0). Training stage 2 uses no system message:
        # "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: {a}###"
        Template(
            name="minigpt4_v0",
            system=MINIGPT4_SYSTEM,
            system_format="{system}###",
            no_system="###",
            user_prefix="Human: ",
            assistant_prefix=" ###Assistant: ",
            turn_end="###",
            stop=("###",),
            image_placeholder="<ImageHere>",
            image_marker="<Img><ImageHere></Img>",
            image_marker_sep=" ",
        ),
        # MiniGPT-4 Llama-2: "[INST] <Img><ImageHere></Img> Describe... [/INST] {a}</s>"
        Template(
            name="llama2",
            system=MINIGPT4_SYSTEM,
            system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
            system_in_first_user=True,
            user_prefix="[INST] ",
            assistant_prefix=" [/INST] ",
            turn_end="</s>",
            turn_sep="<s>",
            stop=("</s>",),
            image_placeholder="<ImageHere>",
            image_marker="<Img><ImageHere></Img>",
            image_marker_sep=" ",
        ),
        # LLaVA-1.5 / ShareGPT4V stage 2: "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: ..."
        Template(
            name="vicuna_v1",
            system=VICUNA_SYSTEM,
            train_system=True,
            system_format="{system} ",
            user_prefix="USER: ",
            assistant_prefix=" ASSISTANT:",
            answer_prefix=" ",
            turn_end="</s>",
            stop=("</s>",),
        ),
        # MiniGPT-4 stage 1: [BOS][image tokens][caption + "\n"]
        Template(
            name="minigpt4_caption",
            turn_end="\n",
            stop=("\n",),
            image_placeholder="<ImageHere>",
            image_marker="<ImageHere>",
            chat=False,
        ),
        # LLaVA / ShareGPT4V pretrain: [BOS]<image> caption "\n"
        Template(name="plain", turn_end="\n", stop=("\n",), chat=False),
    )
}

_DEFAULT: Any = object()  # "use the template's own system message"


def get_template(name: str | Template) -> Template:
    """Look a template up by name (a Template passes through)."""
    if isinstance(name, Template):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown template {name!r}; known: {sorted(TEMPLATES)}") from None


def training_system(template: str | Template) -> str | None:
    """The system message a recipe trains with, and so evaluates with: LLaVA's for ``vicuna_v1``,
    none for MiniGPT-4's stage 2 (whose demo adds one only for chatting)."""
    t = get_template(template)
    return t.system if t.train_system else None


def user_with_image(template: str | Template, text: str) -> str:
    """User message text with the template's image marker in front (LLaVA and MiniGPT-4 style)."""
    t = get_template(template)
    text = text.strip()
    return t.image_marker + (t.image_marker_sep + text if text else "")


def sample_instruction(rng: Any = None, template: str | Template | None = "minigpt4_v0") -> str:
    """A random MiniGPT-4 stage-2 instruction, with the template's image marker unless None.

    ``rng``: ``random.Random``, ``numpy.random.Generator`` or None (module ``random``, which the
    training datasets seed per sample and epoch: ``mmalign.data.sources.sample_randomness``).
    """
    n = len(MINIGPT4_INSTRUCTIONS)
    if rng is None:
        i = random.randrange(n)
    elif hasattr(rng, "integers"):
        i = int(rng.integers(n))
    else:
        i = rng.randrange(n)
    text = MINIGPT4_INSTRUCTIONS[i]
    return text if template is None else user_with_image(template, text)


_BLIP_PUNCT = re.compile(r"([.!\"()*#:;~])")


def clean_caption(text: str, max_words: int = 50) -> str:
    """MiniGPT-4 stage-1 caption cleaning (BLIP ``pre_caption``): lower-case, drop the
    punctuation ``.!"()*#:;~``, squeeze whitespace, keep the first ``max_words`` words."""
    words = _BLIP_PUNCT.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def strip_stop(text: str, template: str | Template) -> str:
    """Cut generated text at the first stop string (and trim whitespace)."""
    return cut_at_stop(text, get_template(template).stop)[0].strip()


def image_token_id(tokenizer: Any) -> int:
    """Id of ``IMAGE_TOKEN``; a clear error if the tokenizer does not know it."""
    tid = _maybe_image_token_id(tokenizer)
    if tid is None:
        raise ValueError(
            f"tokenizer has no {IMAGE_TOKEN!r} token; register it first, e.g. "
            f"tokenizer.add_tokens([{IMAGE_TOKEN!r}], special_tokens=True)"
        )
    return tid


def _maybe_image_token_id(tokenizer: Any) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (tid == unk and getattr(tokenizer, "unk_token", None) != IMAGE_TOKEN):
        return None
    return int(tid)


def stop_token_ids(tokenizer: Any, template: str | Template) -> list[int]:
    """Ids of the stop strings that are single tokens (e.g. ``</s>`` -> eos), for generate()."""
    out = []
    for s in get_template(template).stop:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if len(ids) == 1:
            out.append(ids[0])
    return out


# ---------------------------------------------------------------------------------------------
# segment encoding


def _check_turns(turns: Sequence[Mapping[str, str]]) -> None:
    for i, turn in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if turn.get("role") != want:
            raise ValueError(
                f"turn {i} has role {turn.get('role')!r}, expected {want!r} (turns must alternate user, assistant, ...)"
            )
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"turn {i} has no string 'content'")


def _segments(t: Template, turns: Sequence[Mapping[str, str]], system: str | None) -> list[tuple[str, bool]]:
    """(text, learned) pieces; consecutive prompt text merged so train and chat tokenize alike."""
    segs: list[tuple[str, bool]] = []
    sys_text = t.no_system if system is None else t.system_format.format(system=system)
    prompt = ""
    for i, turn in enumerate(turns):
        if turn["role"] == "user":
            if i == 0:
                prompt += t.user_prefix + sys_text if t.system_in_first_user else sys_text + t.user_prefix
            else:
                prompt += t.turn_sep + t.user_prefix
            prompt += turn["content"] + t.assistant_prefix
        else:
            segs.append((prompt, False))
            segs.append((t.answer_prefix + turn["content"] + t.turn_end, True))
            prompt = ""
    if prompt:
        segs.append((prompt, False))
    return segs


@functools.lru_cache(maxsize=1 << 15)
def _piece_ids(tokenizer: Any, vocab_size: int, piece: str) -> tuple[int, ...]:
    """One piece's token ids, memoised: training encodes the same prompt text for every sample
    and the same answers every epoch (on the toy, tokenizing was a third of making a batch).
    ``vocab_size`` (``len(tokenizer)``) is in the key so tokens added later are never stale (a
    change that keeps the size, e.g. a normaliser swapped in place, would be: build a new tokenizer)."""
    return tuple(tokenizer.encode(piece, add_special_tokens=False))


def _encode_segments(
    tokenizer: Any, t: Template, segs: list[tuple[str, bool]], num_image_tokens: int, memoise: bool = False
) -> tuple[list[int], list[int], int]:
    """Tokenize each segment alone; expand placeholders in prompt text in place. ``memoise``:
    through `_piece_ids` (training, which meets the same pieces again; not served prompts)."""
    img_id = _maybe_image_token_id(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    n_images = 0
    if t.add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError(f"template {t.name!r} adds BOS but the tokenizer has no bos_token")
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, learned in segs:
        pieces = [text] if learned else text.split(t.image_placeholder)
        for k, piece in enumerate(pieces):
            if k > 0:  # a placeholder stood here
                if num_image_tokens <= 0:
                    raise ValueError(
                        f"text contains the image placeholder {t.image_placeholder!r} "
                        f"but num_image_tokens={num_image_tokens}"
                    )
                ids.extend([image_token_id(tokenizer)] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
                n_images += 1
            if not piece:
                continue
            if memoise:
                piece_ids = _piece_ids(tokenizer, len(tokenizer), piece)
            else:
                piece_ids = tokenizer.encode(piece, add_special_tokens=False)
            if img_id is not None and img_id in piece_ids:
                raise ValueError(
                    f"text contains the image token {IMAGE_TOKEN!r} outside the template's "
                    f"placeholder {t.image_placeholder!r}: {piece[:80]!r}"
                )
            ids.extend(piece_ids)
            labels.extend(piece_ids if learned else [IGNORE_INDEX] * len(piece_ids))
    return ids, labels, n_images


def encode_conversation(
    tokenizer: Any,
    template: str | Template,
    turns: Sequence[Mapping[str, str]],
    num_image_tokens: int,
    *,
    system: str | None = _DEFAULT,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Training ids for a conversation: labels are -100 except answers + turn ends.

    ``turns``: ``[{"role": "user"|"assistant", "content": str}, ...]`` alternating, starting
    with the user; a trailing unanswered user turn is dropped (nothing to learn from it).
    ``system``: defaults to the template's; pass None for none (MiniGPT-4 stage 2).
    Returns ``input_ids``, ``labels``, ``num_images`` (placeholders expanded), ``truncated``
    and ``answer_tokens_cut`` (learned tokens lost to ``max_length``).
    Raises ValueError if there is no answer to learn, an answer is empty, the image tokens
    would not fit in ``max_length``, or truncation leaves no answer token.
    """
    t = get_template(template)
    turns = list(turns)
    _check_turns(turns)
    if turns and turns[-1]["role"] == "user":
        turns = turns[:-1]
    if not turns:
        raise ValueError("conversation has no assistant answer to learn from")
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise ValueError(f"turn {i}: empty assistant answer")
    sys_msg = t.system if system is _DEFAULT else system
    ids, labels, n_images = _encode_segments(tokenizer, t, _segments(t, turns, sys_msg), num_image_tokens, True)
    cut = 0
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        img_id = _maybe_image_token_id(tokenizer)
        if img_id is not None and img_id in ids[max_length:]:
            raise ValueError(
                f"the image tokens would not fit in max_length={max_length} "
                f"(sequence of {len(ids)} tokens, {num_image_tokens} image tokens each)"
            )
        cut = sum(1 for x in labels[max_length:] if x != IGNORE_INDEX)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE_INDEX for x in labels):
            raise ValueError(f"max_length={max_length} cuts off every answer token")
    return {
        "input_ids": ids,
        "labels": labels,
        "num_images": n_images,
        "truncated": truncated,
        "answer_tokens_cut": cut,
    }


def encode_caption(
    tokenizer: Any,
    caption: str,
    num_image_tokens: int,
    *,
    fmt: str = "minigpt4_caption",
    max_length: int | None = None,
) -> dict[str, Any]:
    """Stage-1 ids: [BOS][image tokens][caption + "\\n"], only caption + "\\n" learned.

    ``fmt``: ``minigpt4_caption`` or ``plain`` (same layout; clean captions with
    ``clean_caption`` first for MiniGPT-4).
    """
    t = get_template(fmt)
    if t.chat:
        raise ValueError(f"{fmt!r} is a chat template; use encode_conversation")
    turns = [{"role": "user", "content": t.image_marker}, {"role": "assistant", "content": caption}]
    return encode_conversation(tokenizer, t, turns, num_image_tokens, system=None, max_length=max_length)


def build_generation_prompt(
    tokenizer: Any,
    template: str | Template,
    turns: Sequence[Mapping[str, str]],
    num_image_tokens: int,
    *,
    system: str | None = _DEFAULT,
) -> list[int]:
    """Prompt ids for chat / eval, ending with the assistant prefix; turns end with the user.

    Identical to the training ids of the same turns up to where the answer starts.
    """
    t = get_template(template)
    turns = list(turns)
    _check_turns(turns)
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("a generation prompt needs turns that end with a user message")
    sys_msg = t.system if system is _DEFAULT else system
    ids, _, _ = _encode_segments(tokenizer, t, _segments(t, turns, sys_msg), num_image_tokens)
    return ids


def encode_user_turn(
    tokenizer: Any,
    template: str | Template,
    content: str,
    num_image_tokens: int,
    *,
    first: bool,
    system: str | None = _DEFAULT,
) -> list[int]:
    """Ids of one user turn up to the assistant prefix, laid out as `build_generation_prompt`
    lays it out: with BOS and the system message when `first`, else as the continuation after
    the previous answer's turn end. A chat with a KV cache appends these ids to the ones the
    model produced instead of re-encoding the conversation."""
    t = get_template(template)
    turn = [{"role": "user", "content": content}]
    if first:
        return build_generation_prompt(tokenizer, t, turn, num_image_tokens, system=system)
    text = t.turn_sep + t.user_prefix + content + t.assistant_prefix
    ids, _, _ = _encode_segments(tokenizer, dataclasses.replace(t, add_bos=False), [(text, False)], num_image_tokens)
    return ids


# ---------------------------------------------------------------------------------------------
# Hugging Face chat template (Jinja), for users of plain transformers


def chat_template(template: str | Template, image_tokens: int = 1) -> str:
    """A Jinja chat template that renders ``apply_chat_template`` messages exactly as this module
    renders the same turns as text: BOS as text, each image as the template's image marker holding
    ``image_tokens`` copies of ``IMAGE_TOKEN``. A ``system`` message replaces the template's default.

    For users of an exported folder (plain transformers, vLLM); mmalign itself encodes segment by
    segment (``build_generation_prompt``). A Llava processor expands one image token itself
    (``image_tokens=1``); Blip2's does not, so its template writes all ``num_query_tokens``. The
    user content is a loop over its parts, which is how vLLM recognises the "openai" content
    format (with "string" it flattens the parts itself and drops the marker around the image).
    """
    t = get_template(template)
    if not t.chat:
        raise ValueError(f"{t.name!r} is a caption format, not a chat template")
    q = json.dumps  # Jinja string literals (JSON strings are valid Jinja strings)
    sys_pre, sys_post = t.system_format.split("{system}")
    marker = t.image_marker.replace(t.image_placeholder, IMAGE_TOKEN * image_tokens)
    default_sys = t.no_system if t.system is None else t.system_format.format(system=t.system)
    first_user = "u + s" if t.system_in_first_user else "s + u"
    texts = "selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')"
    return (
        "{%- set u = " + q(t.user_prefix) + " -%}"
        "{%- set s = " + q(default_sys) + " -%}"
        "{%- set turns = messages -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set c = messages[0]['content'] -%}"
        "{%- if c is not string -%}{%- set c = c | " + texts + " -%}{%- endif -%}"
        "{%- set s = " + q(sys_pre) + " + c + " + q(sys_post) + " -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- endif -%}" + ("{{- bos_token -}}" if t.add_bos else "") + "{%- for m in turns -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- if loop.first -%}{{- " + first_user + " -}}{%- else -%}{{- " + q(t.turn_sep) + " + u -}}{%- endif -%}"
        "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}"
        "{%- set ns = namespace(images=0, texts=[]) -%}"
        "{%- for part in m['content'] -%}"
        "{%- if part['type'] in ('image', 'image_url') -%}{%- set ns.images = ns.images + 1 -%}"
        "{%- elif part['type'] == 'text' -%}{%- set ns.texts = ns.texts + [part['text']] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set text = ns.texts | join(' ') | trim -%}"
        "{{- " + q(marker) + " * ns.images -}}"
        "{%- if ns.images and text -%}{{- " + q(t.image_marker_sep) + " -}}{%- endif -%}{{- text -}}"
        "{%- endif -%}"
        "{%- if not loop.last or add_generation_prompt -%}{{- " + q(t.assistant_prefix) + " -}}{%- endif -%}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{%- set c = m['content'] if m['content'] is string else m['content'] | " + texts + " -%}"
        "{{- " + q(t.answer_prefix) + " + c + " + q(t.turn_end) + " -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
