"""Padding, packing and batching: right padding (or packed rows) for training, left padding for
batched generation.

Packing (``pack_tokens``) places a batch's samples whole into rows of at most ``pack_tokens``
tokens, first-fit decreasing, so a batch of mixed lengths is not padded to its longest sample.
The batch keeps its samples (the loss is the mean over the same answer tokens, so the gradients
are those of the padded batch); only the layout changes: positions restart per sample, and
``sample_ids`` tell the model which tokens belong together (``mmalign.model.inputs`` turns them
into restarting ``position_ids`` or a block mask, per architecture).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmalign.prompts import IGNORE_INDEX

IMAGE_KEYS = ("pixel_values", "image_features")  # images, or their cached frozen features


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


def _stack_images(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor | None]:
    """Each image key's present tensors stacked in sample order (the order of their image tokens)."""
    out: dict[str, torch.Tensor | None] = {"pixel_values": None}
    for key in IMAGE_KEYS:
        present = [torch.as_tensor(b[key]) for b in items if b.get(key) is not None]
        if present:
            out[key] = torch.stack(present)
    return out


def collate(
    batch: Sequence[Mapping[str, Any] | None], pad_token_id: int, pack_tokens: int | None = None
) -> dict[str, Any] | None:
    """A training batch; None samples (skipped by the dataset) are dropped.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (-100 padding), ``pixel_values`` (the
    present images stacked in sample order, matching the order of their image tokens; None if no
    sample has one) or ``image_features`` (cached features, the same way), and ``num_samples``;
    None if no sample is left. With ``pack_tokens`` the rows are packed (``pack``)."""
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token")
    items = [b for b in batch if b is not None]
    if not items:
        return None
    if pack_tokens is not None:
        return pack(items, pack_tokens, pad_token_id)
    input_ids, attention_mask = _pad([b["input_ids"] for b in items], pad_token_id, left=False)
    labels, _ = _pad([b["labels"] for b in items], IGNORE_INDEX, left=False)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        **_stack_images(items),
        "num_samples": len(items),
    }


def pack_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing (longest first, each into the first row with
    room), every sample whole. A sample longer than ``budget`` is an error, not a silent cut."""
    too_long = [n for n in lengths if n > budget]
    if too_long:
        raise ValueError(f"a sample of {max(too_long)} tokens does not fit a packed row of {budget} (data.pack_tokens)")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(budget)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def pack(items: Sequence[Mapping[str, Any]], budget: int, pad_token_id: int) -> dict[str, Any]:
    """Samples packed whole into rows of at most ``budget`` tokens (padded to the longest row).

    Per token: ``position_ids`` restart at 0 for each sample (and for the padding), ``sample_ids``
    name the sample (its index in ``items``; -1 for padding), and each sample's first label is
    -100, so no sample learns to predict its neighbour's first token. Images follow the packed
    order of their samples."""
    seqs = [torch.as_tensor(b["input_ids"]).reshape(-1).tolist() for b in items]
    labels = [[IGNORE_INDEX, *torch.as_tensor(b["labels"]).reshape(-1).tolist()[1:]] for b in items]
    for i, (ids, lab) in enumerate(zip(seqs, labels)):
        if not ids or len(lab) != len(ids):
            raise ValueError(
                f"sample {i} of the batch: {len(ids)} input ids, {len(lab)} labels (pack needs equal, > 0)"
            )
    rows = pack_rows([len(s) for s in seqs], budget)
    width = max(sum(len(seqs[i]) for i in row) for row in rows)
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": [], "sample_ids": []}
    for row in rows:  # built as lists, one tensor per field at the end: a tensor write per sample costs more
        ids = [t for i in row for t in seqs[i]]
        fill = width - len(ids)
        columns["input_ids"].append(ids + [pad_token_id] * fill)
        columns["labels"].append([t for i in row for t in labels[i]] + [IGNORE_INDEX] * fill)
        columns["position_ids"].append([p for i in row for p in range(len(seqs[i]))] + list(range(fill)))
        columns["sample_ids"].append([i for i in row for _ in seqs[i]] + [-1] * fill)
    out = {name: torch.tensor(values, dtype=torch.long) for name, values in columns.items()}
    order = [i for row in rows for i in row]
    return {
        **out,
        "attention_mask": None,
        **_stack_images([items[i] for i in order]),
        "num_samples": len(items),
    }


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` + ``attention_mask`` so batched generation continues every
    prompt at the same position."""
    if not sequences:
        raise ValueError("left_pad needs at least one sequence")
    input_ids, attention_mask = _pad(sequences, pad_id, left=True)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
