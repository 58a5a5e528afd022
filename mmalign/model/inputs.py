"""The keyword arguments of one training forward, for every architecture: images or cached
features, padded or packed rows. One path, so what differs per class is data of its
``Architecture`` entry, and the stage run never asks which class it trains.

- cached features (``image_features``) go in projected, as ``mm_encoder_outputs``, with
  ``pixel_values=None``;
- packed rows (``sample_ids`` from ``mmalign.data.collate.pack``) go in with restarting
  ``position_ids`` and either ``attention_mask=None`` (transformers then derives a block-causal
  mask from the positions) or a 4-D additive block mask (0 / -inf: Blip2 replaces a missing mask by
  ones, and a boolean 4-D mask is wrong under eager attention);
- padded rows get explicit per-row ``position_ids`` (the ``arange`` transformers would derive):
  the same input shapes as packed rows, so one compiled decoder-layer graph (``train.compile``)
  serves stage 1's packed rows and stage 2's padded ones instead of compiling twice;
- ``use_cache=False`` always: by default the LLM builds a KV cache even in training, and with a
  cache transformers no longer looks for packed sequences, so the samples of a row would attend to
  each other without a word.
"""

from __future__ import annotations

from typing import Any

import torch

from mmalign.model.architectures import architecture_of
from mmalign.model.features import cached_prefixes, encoder_outputs


def block_mask(sample_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, L]`` sample ids -> ``[rows, 1, L, L]`` additive mask: a token attends to earlier
    tokens of its own sample only (padding, id -1, to earlier padding)."""
    length = sample_ids.shape[1]
    same = sample_ids[:, :, None] == sample_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=sample_ids.device).tril()
    mask = torch.zeros(same.shape, dtype=dtype, device=sample_ids.device)
    return mask.masked_fill_(~(same & causal), torch.finfo(dtype).min)[:, None]


def _frozen_dtype(model: Any) -> torch.dtype:
    """The dtype the frozen part computes in (what the image path hands the projector)."""
    prefixes = cached_prefixes(model)
    return next(p.dtype for n, p in model.named_parameters() if n.startswith(prefixes))


def training_inputs(model: Any, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """``batch`` (from ``mmalign.data.collate``) -> the kwargs of ``model(**kwargs).loss``.
    ``model`` is the unwrapped model (the projection of cached features runs on it)."""
    inputs: dict[str, Any] = {
        "input_ids": batch["input_ids"].to(device),
        "labels": batch["labels"].to(device),
        "use_cache": False,
    }
    features = batch.get("image_features")
    if features is not None:
        features = features.to(device, _frozen_dtype(model))
        inputs.update(pixel_values=None, mm_encoder_outputs=encoder_outputs(model, features))
    elif batch.get("pixel_values") is not None:
        inputs["pixel_values"] = batch["pixel_values"].to(device)
    if batch.get("sample_ids") is None:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
        rows, length = inputs["input_ids"].shape  # right-padded rows: positions 0.. in each
        inputs["position_ids"] = torch.arange(length, device=device).expand(rows, length)
        return inputs
    inputs["position_ids"] = batch["position_ids"].to(device)
    if architecture_of(model).packed_attention == "block_mask":
        if getattr(model.config, "_attn_implementation", None) == "flash_attention_2":
            raise ValueError(
                f"{model.config.model_type}: packed rows need a 4-D block mask, which flash_attention_2 does "
                "not take; use model.attn_implementation=sdpa or data.packing=false"
            )
        dtype = model.get_input_embeddings().weight.dtype
        inputs["attention_mask"] = block_mask(batch["sample_ids"].to(device), dtype)
    else:
        inputs["attention_mask"] = None
    return inputs


def per_sample_losses(
    logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor | None = None
) -> dict[int, float]:
    """Mean next-token loss of each sample of a batch, padded (rows are samples: ``sample_ids``
    None) or packed: what must not change when a batch is packed."""
    rows, length = labels.shape
    if sample_ids is None:
        sample_ids = torch.arange(rows, device=labels.device)[:, None].expand(rows, length)
    targets, owners = labels[:, 1:], sample_ids[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
    ).view(rows, length - 1)
    kept = targets != -100
    return {int(s): token_loss[kept & (owners == s)].mean().item() for s in owners[kept].unique()}


__all__ = ["block_mask", "per_sample_losses", "training_inputs"]
