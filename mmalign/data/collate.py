"""Padding and batching: right padding for training, left padding for batched generation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmalign.prompts import IGNORE_INDEX


def _pad(seqs: Sequence[Any], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    n = max(t.numel() for t in tensors)
    out = torch.full((len(tensors), n), value, dtype=torch.long)
    mask = torch.zeros((len(tensors), n), dtype=torch.long)
    for i, t in enumerate(tensors):
        sl = slice(n - t.numel(), n) if left else slice(0, t.numel())
        out[i, sl] = t
        mask[i, sl] = 1
    return out, mask


def collate(batch: Sequence[Mapping[str, Any] | None], pad_token_id: int) -> dict[str, Any] | None:
    """Right-padded training batch; None samples (skipped by the dataset) are dropped.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (-100 padding) and ``pixel_values``
    (the present images stacked in sample order, matching the order of their image tokens;
    None if no sample has one), or None if no sample is left.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token")
    items = [b for b in batch if b is not None]
    if not items:
        return None
    input_ids, attention_mask = _pad([b["input_ids"] for b in items], pad_token_id, left=False)
    labels, _ = _pad([b["labels"] for b in items], IGNORE_INDEX, left=False)
    images = [b["pixel_values"] for b in items if b.get("pixel_values") is not None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.stack([torch.as_tensor(x) for x in images]) if images else None,
    }


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` + ``attention_mask`` so batched generation continues every
    prompt at the same position."""
    if not sequences:
        raise ValueError("left_pad needs at least one sequence")
    input_ids, attention_mask = _pad(sequences, pad_id, left=True)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
