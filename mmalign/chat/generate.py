"""Generation for the chat engine, the server and evaluation.

- `generate_batch`: many independent prompts at once (evaluation, curation, sample answers).
- `generate_rows`: one batched `generate` call for prompts with their own token budget and stop
  strings, streaming each row's text as it grows (the server's batches).
- `model_generate`: `model.generate` for every architecture, also with a prefilled cache.

Prompts are left-padded so every row continues at the same position; images are stacked in
row order, which is the order of their image tokens. Decoding stops at the template's stop
strings (single-token ones are passed to `generate` as extra EOS ids, the rest are matched as
text).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import GenerationMixin, StoppingCriteria, StoppingCriteriaList

from mmalign.data.collate import left_pad
from mmalign.model.architectures import architecture_of, check_image_tokens
from mmalign.model.bundle import LoadedModel
from mmalign.prompts import (
    Template,
    build_generation_prompt,
    cut_at_stop,
    get_template,
    stop_prefix_len,
    stop_token_ids,
    strip_stop,
)

# transformers 5.x renames generate's `past_key_values` to `cache` (the old name is deprecated)
CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


def generation_kwargs(tokenizer: Any, template: Template, **overrides: Any) -> dict[str, Any]:
    """Greedy by default (evaluation is greedy); stop on EOS and the template's turn end.

    A turn end such as `###` is not one token in every context (Vicuna and the toy tokenizer
    split it after a word), so it is matched as a stop *string*, as MiniGPT-4's own stopping
    criteria do; single-token stops are also passed as EOS ids.
    """
    eos = [tokenizer.eos_token_id, *stop_token_ids(tokenizer, template)]
    kw = {
        "max_new_tokens": 128,
        "do_sample": False,
        "num_beams": 1,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": sorted(set(eos)),
        "stop_strings": list(template.stop),
        "tokenizer": tokenizer,
    }
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if not kw.get("do_sample"):
        kw.pop("temperature", None), kw.pop("top_p", None)
    return kw


def model_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """`model.generate`, also where Blip2's own `generate` cannot serve.

    Llava-like models take the full ids, a prefilled cache and only the *new* images: generate
    feeds the model the uncached tail and the new images are scattered into the tail's image
    tokens. Blip2's `generate` needs pixel_values and scatters them over *every* image token of
    the sequence, so for text-only turns, or with a cache that already holds earlier images, we
    embed the ids ourselves, scatter the new images' features into the uncached positions only
    and let the language model generate from the embeddings.
    """
    if getattr(model.config, "vision_config", None) is None:  # a text-only LLM (the curation fixer)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    cache = kwargs.get(CACHE_KWARG)
    past = cache.get_seq_length() if cache is not None else 0
    if architecture_of(model).generate_continues_cache or (pixel_values is not None and past == 0):
        extra = {"pixel_values": pixel_values} if pixel_values is not None else {}
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **extra, **kwargs)
    embeds = model.get_input_embeddings()(input_ids)  # [B, T, D]
    if pixel_values is not None:
        feats = model.get_image_features(pixel_values=pixel_values).pooler_output  # [N, Q, D]
        mask = input_ids == model.config.image_token_index
        mask[:, :past] = False
        embeds = embeds.masked_scatter(mask[..., None], feats.to(embeds.dtype))
    return model.language_model.generate(
        input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **kwargs
    )


def answer_ids(tokenizer: Any, generated: list[int], target: str) -> tuple[list[int], list[int]]:
    """The ids a conversation keeps for an answer whose text must be ``target`` (the visible
    answer + the turn end): the longest prefix of ``generated`` whose text starts ``target``,
    as produced, and the ids of what the model did not say (the turn end after EOS or the token
    budget, the rest of a token that ran past a stop string). Chat and curation both use it."""
    keep = len(generated)
    while keep and not target.startswith(tokenizer.decode(generated[:keep], skip_special_tokens=False)):
        keep -= 1
    tail = target[len(tokenizer.decode(generated[:keep], skip_special_tokens=False)) :]
    return generated[:keep], tokenizer.encode(tail, add_special_tokens=False) if tail else []


@torch.no_grad()
def generate_batch(
    loaded: LoadedModel,
    items: Sequence[tuple[Image.Image | None, list[dict[str, str]]]],
    *,
    system: str | None = None,
    batch_size: int = 32,
    **gen: Any,
) -> list[str]:
    """Answer each (image, turns) item; turns end with a user message holding the image marker."""
    model, tokenizer, t = loaded.model, loaded.tokenizer, get_template(loaded.template)
    kwargs = generation_kwargs(tokenizer, t, **gen)
    answers: list[str] = []
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [
            build_generation_prompt(tokenizer, t, turns, loaded.num_image_tokens, system=system) for _, turns in chunk
        ]
        batch = left_pad(prompts, tokenizer.pad_token_id)
        images = [im for im, _ in chunk if im is not None]
        if not loaded.text_only:
            check_image_tokens(batch["input_ids"], len(images), model.config)
        inputs = {k: v.to(loaded.device) for k, v in batch.items()}
        if images:
            inputs["pixel_values"] = loaded.pixel_values(images)
        out = model_generate(model, **inputs, **kwargs)
        new = out[:, batch["input_ids"].shape[1] :]
        answers += [strip_stop(tokenizer.decode(row, skip_special_tokens=True), t) for row in new]
    return answers


# --------------------------------------------------------------------------- rows with their own limits


@dataclass
class Row:
    """One prompt of a batched call: its ids, its transformed images (in image-token order),
    its own token budget and extra stop strings. `on_text` receives the answer's text as it
    grows (stop strings never shown); setting `cancelled` ends the row at the next step."""

    input_ids: list[int]
    images: list[torch.Tensor] = field(default_factory=list)
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by generate_rows
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"


class _RowsCriteria(StoppingCriteria):
    """Per-row stopping *and* streaming: called once per step with every row's ids so far, it
    decodes each live row's new tokens, cuts at that row's stop strings, sends the text that can
    no longer turn into a stop string, and reports the rows that are done."""

    def __init__(self, rows: Sequence[Row], tokenizer: Any, template: Template, eos_ids: Sequence[int]):
        self.rows, self.tok, self.eos = rows, tokenizer, set(eos_ids)
        self.stops = [tuple(template.stop) + tuple(r.stop) for r in rows]
        self.shown = [0] * len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(len(self.rows), dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(self.rows):
            if row.finish_reason is not None:
                done[i] = True
                continue
            token = int(input_ids[i, -1])
            row.token_ids.append(token)
            text = self.tok.decode(row.token_ids, skip_special_tokens=True).lstrip()
            visible, stopped = cut_at_stop(text, self.stops[i])
            if token in self.eos:
                stopped = True
            if row.cancelled.is_set():
                row.finish_reason = "cancelled"
            elif stopped:
                row.finish_reason = "stop"
            elif len(row.token_ids) >= row.max_new_tokens:
                row.finish_reason = "length"
            # hold back what may still change: a stop string's start, a character whose bytes
            # have not all arrived yet (decoded as U+FFFD)
            partial = len(visible) - len(visible.rstrip("\ufffd"))
            hold = 0 if row.finish_reason else max(stop_prefix_len(visible, self.stops[i]), partial)
            self._show(i, visible[: len(visible) - hold])
            done[i] = row.finish_reason is not None
        return done

    def _show(self, i: int, visible: str) -> None:
        row = self.rows[i]
        row.text = visible
        if len(visible) > self.shown[i] and row.on_text is not None:
            row.on_text(visible[self.shown[i] :])
        self.shown[i] = max(self.shown[i], len(visible))


KV_CACHES = ("dynamic", "static")  # generate_rows' kv_cache: transformers' cache_implementation


@torch.no_grad()
def generate_rows(loaded: LoadedModel, rows: Sequence[Row], kv_cache: str = "dynamic", **gen: Any) -> None:
    """Generate every row in ONE left-padded batch (same sampling settings for all rows);
    each row ends at its own stop strings / budget, its text streamed through `on_text`.
    Results land in the rows (`text`, `token_ids`, `finish_reason`). ``kv_cache="static"``:
    transformers' preallocated cache, where the dynamic one concatenates every layer's keys and
    values at each new token (on CPU, a third of a 64-row batch's time; docs/performance.md)."""
    model, tokenizer, t = loaded.model, loaded.tokenizer, get_template(loaded.template)
    kwargs = generation_kwargs(tokenizer, t, **gen)
    kwargs.pop("stop_strings"), kwargs.pop("tokenizer")  # matched per row by _RowsCriteria
    kwargs["max_new_tokens"] = max(r.max_new_tokens for r in rows)
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache={kv_cache!r}: expected one of {KV_CACHES}")
    if kv_cache == "static":  # without transformers' auto-compile of static caches on GPU (CUDA graphs per shape)
        kwargs.update(cache_implementation="static", disable_compile=True)
    device, dtype = loaded.device, loaded.dtype
    batch = left_pad([r.input_ids for r in rows], tokenizer.pad_token_id)
    images = [im for r in rows for im in r.images]
    if not loaded.text_only:
        check_image_tokens(batch["input_ids"], len(images), model.config)
    criteria = _RowsCriteria(rows, tokenizer, t, kwargs["eos_token_id"])
    pixel_values = torch.stack(images).to(device, dtype) if images else None
    model.eval()
    model_generate(
        model,
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        pixel_values,
        stopping_criteria=StoppingCriteriaList([criteria]),
        **kwargs,
    )
    for row in rows:  # generate ended (e.g. every row at EOS) before a row said why
        if row.finish_reason is None:
            row.finish_reason = "length"
