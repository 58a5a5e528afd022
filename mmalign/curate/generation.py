"""Batched two-turn generation for the describe step: a first answer for every image, then a
second user turn (``Continue``) for some rows, on the first turn's KV cache.

Every row of the first turn has the same prompt (same instruction, same number of image
tokens), so it needs no padding. For the second turn the cache keeps each row's prompt and the
answer ids the model produced; what a row generated past its answer (tokens after the stop
string, padding after EOS) stays in the cache but is masked out, and each row's new ids (the
rest of its turn end, the new user turn) are left-padded. Positions come from the attention
mask, so every row continues exactly where its own answer ended: greedy answers are the ones a
``ChatSession`` gives (``tests/curate/test_generation.py``). Beam search cannot continue a
cache in transformers, so with beams the second turn re-encodes the conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache

from mmalign.chat.generate import CACHE_KWARG, answer_ids, generation_kwargs, model_generate
from mmalign.data.collate import left_pad
from mmalign.model.bundle import LoadedModel
from mmalign.prompts import build_generation_prompt, cut_at_stop, encode_user_turn, get_template, user_with_image


@dataclass
class RowAnswer:
    text: str  # the answer, cut at the stop string, stripped
    kept: list[int]  # the generated ids that make the answer (and as much of the turn end as was said)
    tail: list[int]  # ids of the rest of the turn end, not said by the model


@dataclass
class FirstTurn:
    prompt: list[int]  # the prompt every row shares
    out: torch.Tensor  # [B, P + G] ids from generate
    cache: DynamicCache | None  # None with beam search
    rows: list[RowAnswer]
    images: Sequence[Image.Image]
    device: torch.device


def settle(tokenizer: Any, stops: Sequence[str], turn_end: str, generated: list[int]) -> RowAnswer:
    """The answer in ``generated`` and the ids that make it, as ``ChatSession`` keeps them: the
    longest prefix whose text starts ``answer + turn_end``, plus the ids of what is missing."""
    visible, _ = cut_at_stop(tokenizer.decode(generated, skip_special_tokens=True), stops)
    kept, tail = answer_ids(tokenizer, generated, visible + turn_end)
    return RowAnswer(visible.strip(), kept, tail)


@torch.no_grad()
def first_batch(
    loaded: LoadedModel, images: Sequence[Image.Image], prompt: str, system: str | None, gen: dict[str, Any]
) -> FirstTurn:
    """Every image answered with ``prompt`` in one batch; the cache is kept for a second turn."""
    model, tok, t = loaded.model, loaded.tokenizer, get_template(loaded.template)
    ids = build_generation_prompt(
        tok, t, [{"role": "user", "content": user_with_image(t, prompt)}], loaded.num_image_tokens, system=system
    )
    kwargs = generation_kwargs(tok, t, **gen)
    beams = kwargs.get("num_beams", 1) > 1
    cache = None if beams else DynamicCache(config=model.config.get_text_config())
    input_ids = torch.tensor([ids] * len(images), device=loaded.device)
    extra = {} if cache is None else {CACHE_KWARG: cache}
    model.eval()
    out = model_generate(
        model, input_ids, torch.ones_like(input_ids), loaded.pixel_values(list(images)), **kwargs, **extra
    )
    rows = [settle(tok, t.stop, t.turn_end, row[len(ids) :].tolist()) for row in out.cpu()]
    return FirstTurn(ids, out.cpu(), cache, rows, images, loaded.device)


@torch.no_grad()
def continue_batch(
    loaded: LoadedModel, first: FirstTurn, todo: Sequence[int], text: str, gen: dict[str, Any]
) -> list[str]:
    """The answers of rows ``todo`` to a second user turn ``text``."""
    model, tok, t = loaded.model, loaded.tokenizer, get_template(loaded.template)
    user = encode_user_turn(tok, t, text, loaded.num_image_tokens, first=False)
    kwargs = generation_kwargs(tok, t, **gen)
    if first.cache is None:  # beam search: the whole conversation again, images included
        seqs = [first.prompt + first.rows[i].kept + first.rows[i].tail + user for i in todo]
        batch = left_pad(seqs, tok.pad_token_id)
        pixels = loaded.pixel_values([first.images[i] for i in todo])
        ids, mask = batch["input_ids"].to(loaded.device), batch["attention_mask"].to(loaded.device)
        out = model_generate(model, ids, mask, pixels, **kwargs)
    else:
        ids, mask, cache = _on_cache(first, todo, user, tok.pad_token_id)
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        out = model_generate(model, ids, mask, None, **kwargs, **{CACHE_KWARG: cache})
    new = out[:, ids.shape[1] :].cpu()
    return [settle(tok, t.stop, t.turn_end, row.tolist()).text for row in new]


def _on_cache(
    first: FirstTurn, todo: Sequence[int], user: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
    """Full ids and mask for the rows ``todo`` over the first turn's cache (cut to those rows):
    ``[prompt | cached answer ids, junk masked | left-padded new ids]``."""
    P, G = len(first.prompt), first.out.shape[1] - len(first.prompt)
    cached = G - 1  # the last generated token was never fed to the model
    fed = [min(len(first.rows[i].kept), cached) for i in todo]
    news = [first.rows[i].kept[f:] + first.rows[i].tail + user for i, f in zip(todo, fed)]
    cache = first.cache
    cache.batch_select_indices(torch.tensor(list(todo), device=first.device))
    width = P + max(fed)  # cached positions after the longest kept answer are dropped
    if cache.get_seq_length() > width:
        cache.crop(width - cache.get_seq_length())
    length = max(map(len, news))
    ids = torch.full((len(todo), width + length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (i, f, new) in enumerate(zip(todo, fed, news)):
        ids[row, :width] = first.out[i, :width]
        mask[row, : P + f] = 1
        ids[row, width + length - len(new) :] = torch.tensor(new, dtype=torch.long)
        mask[row, width + length - len(new) :] = 1
    return ids, mask, cache


__all__ = ["FirstTurn", "RowAnswer", "continue_batch", "first_batch", "settle"]
