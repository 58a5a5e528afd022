"""Helpers for model tests (a uniquely named module: tests/ has no packages)."""

from __future__ import annotations

import torch

ARCHS = ["minigpt4", "minigpt4_patch", "llava"]


def make_inputs(model, tok, batch: int = 2, seed: int = 0, images_per_row: int = 1):
    """input_ids = BOS, some text, N image tokens per image, more text; random pixels; labels."""
    from mmalign.model import num_image_tokens

    g = torch.Generator().manual_seed(seed)
    n = num_image_tokens(model.config)
    text = tok("a red circle", add_special_tokens=False)["input_ids"]
    tail = tok(" above a blue square.", add_special_tokens=False)["input_ids"]
    row = [tok.bos_token_id, *text, *([model.config.image_token_index] * n * images_per_row), *tail]
    input_ids = torch.tensor([row] * batch)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(batch * images_per_row, 3, size, size, generator=g)
    labels = input_ids.masked_fill(input_ids == model.config.image_token_index, -100)
    mask = torch.ones_like(input_ids)
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, labels=labels)


def mixed_length_samples(model, tok, n: int = 5, seed: int = 0, max_text: int = 20):
    """Collate-ready samples of different lengths: BOS, the image tokens, random text (labels on
    the text), one random image each."""
    from mmalign.model import num_image_tokens

    g = torch.Generator().manual_seed(seed)
    k = num_image_tokens(model.config)
    size = model.config.vision_config.image_size
    out = []
    for _ in range(n):
        text = torch.randint(5, len(tok) - 1, (int(torch.randint(3, max_text, (1,), generator=g)),), generator=g)
        text = text.masked_fill(text == model.config.image_token_index, 5).tolist()
        ids = [tok.bos_token_id, *([model.config.image_token_index] * k), *text]
        out.append({"input_ids": ids, "labels": [-100] * (1 + k) + text, "pixel_values": torch.randn(3, size, size)})
    return out
