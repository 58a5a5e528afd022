"""Batched generation for many independent prompts (evaluation, curation, sample answers).

Prompts are left-padded so every row continues at the same position; images are stacked in
row order, which is the order of their image tokens. Decoding stops at the template's stop
strings (single-token ones are passed to `generate` as extra EOS ids, the rest are cut after).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image

from mmalign.data.collate import left_pad
from mmalign.model import check_image_tokens, num_image_tokens
from mmalign.prompts import Template, build_generation_prompt, get_template, stop_token_ids, strip_stop


def generation_kwargs(tokenizer: Any, template: Template, **overrides: Any) -> dict[str, Any]:
    """Greedy by default (evaluation is greedy); stop on EOS and the template's turn end.

    A turn end such as `###` is not one token in every context (Vicuna and the toy tokenizer
    split it after a word), so it is matched as a stop *string*, as MiniGPT-4's own stopping
    criteria do; single-token stops are also passed as EOS ids.
    """
    eos = [tokenizer.eos_token_id, *stop_token_ids(tokenizer, template)]
    kw = {"max_new_tokens": 128, "do_sample": False, "num_beams": 1, "pad_token_id": tokenizer.pad_token_id,
          "eos_token_id": sorted(set(eos)), "stop_strings": list(template.stop), "tokenizer": tokenizer}  # fmt: skip
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if not kw.get("do_sample"):
        kw.pop("temperature", None), kw.pop("top_p", None)
    return kw


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    template: str | Template,
    items: Sequence[tuple[Image.Image | None, list[dict[str, str]]]],
    image_transform: Callable[[Image.Image], torch.Tensor],
    *,
    system: str | None = None,
    batch_size: int = 32,
    **gen: Any,
) -> list[str]:
    """Answer each (image, turns) item; turns end with a user message holding the image marker."""
    t = get_template(template)
    n_img = num_image_tokens(model.config)
    kwargs = generation_kwargs(tokenizer, t, **gen)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    answers: list[str] = []
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [build_generation_prompt(tokenizer, t, turns, n_img, system=system) for _, turns in chunk]
        batch = left_pad(prompts, tokenizer.pad_token_id)
        images = [image_transform(im) for im, _ in chunk if im is not None]
        check_image_tokens(batch["input_ids"], len(images), model.config)
        inputs = {k: v.to(device) for k, v in batch.items()}
        if images:
            inputs["pixel_values"] = torch.stack(images).to(device, dtype)
        out = model.generate(**inputs, **kwargs)
        new = out[:, batch["input_ids"].shape[1] :]
        answers += [strip_stop(tokenizer.decode(row, skip_special_tokens=True), t) for row in new]
    return answers
