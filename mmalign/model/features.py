"""The frozen part of a model as a function of its own, so its outputs can be computed once.

Image -> the projector's input (MiniGPT-4: the Q-Former's 32 queries; LLaVA and the patch-merge
class: the selected vision features) is what a feature cache stores; a training step on cached
features projects them and hands them to the class's own forward through ``mm_encoder_outputs``
(transformers' way in for precomputed encoder outputs), which scatters them at the image tokens
exactly as it scatters features it computed itself. Which part is frozen and how it is selected are
facts of each ``Architecture`` entry.

The fingerprint says what produced a cache (the frozen weights, the image transform, the feature
layer and selection, the compute dtype), so a cache is never used with anything else.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from mmalign.model.architectures import architecture_of


def frozen_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[n, 3, H, W]`` images -> ``[n, tokens, width]``: what the projector reads."""
    return architecture_of(model).frozen_features(model, pixel_values)


def encoder_outputs(model: Any, features: torch.Tensor) -> dict[str, Any]:
    """Cached features projected, as the ``mm_encoder_outputs`` of the model's forward (gradients
    flow into the projector as on the image path)."""
    from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

    embeddings = architecture_of(model).project_features(model, features)
    # Blip2's forward also reads .qformer_outputs / .vision_outputs (None here); Llava's only .pooler_output
    return {"image": BaseModelOutputWithVisionQformerOutputs(pooler_output=embeddings)}


def cached_prefixes(model: Any) -> tuple[str, ...]:
    arch = architecture_of(model)
    return tuple(p for role in arch.cached_roles for p in arch.roles[role])


def cached_part_trains(model: Any) -> list[str]:
    """Trainable parameters inside the part a cache replaces (ShareGPT4V stage 1 tunes half the ViT)."""
    prefixes = cached_prefixes(model)
    return [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefixes)]


def weights_digest(model: Any) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the frozen part's tensors."""
    prefixes = cached_prefixes(model)
    digest = hashlib.sha256()
    for name, tensor in sorted([*model.named_parameters(), *model.named_buffers()], key=lambda item: item[0]):
        if not name.startswith(prefixes):
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def describe_transform(transform: Any) -> Any:
    """A JSON-able description of an image transform: its own ``describe()`` if it has one, else
    its processor's settings (an ``ImageTransform``), else its ``repr``."""
    describe = getattr(transform, "describe", None)
    if callable(describe):
        return describe()
    processor = getattr(transform, "processor", None)
    if processor is not None and hasattr(processor, "to_dict"):
        settings = {k: v for k, v in processor.to_dict().items() if not k.startswith("_")}
        extra = {k: v for k, v in vars(transform).items() if k != "processor"}
        return json.loads(json.dumps({"class": type(transform).__name__, **extra, "processor": settings}, default=str))
    return repr(transform)


def feature_fingerprint(model: Any, transform: Any, autocast: str = "no") -> dict[str, Any]:
    """What a cache of ``model``'s frozen part over images through ``transform`` depends on.
    ``autocast``: the stage's mixed precision, under which its forward (and the cache's) runs."""
    arch = architecture_of(model)
    dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if n.startswith(cached_prefixes(model))})
    return {
        "architecture": arch.model_type,
        "frozen_weights": weights_digest(model),
        "features": json.loads(json.dumps(arch.feature_settings(model.config), default=str)),
        "transform": describe_transform(transform),
        "compute_dtype": dtypes,
        "autocast": autocast,
    }


def fingerprint_differences(cached: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    """One line per field that differs (nested fields by their dotted name), naming both values."""

    def show(value: Any) -> str:
        text = json.dumps(value, sort_keys=True, default=str)
        return text[:16] + "..." if len(text) > 40 else text

    lines = []
    for key in sorted(set(cached) | set(expected)):
        mine, theirs = cached.get(key), expected.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            lines += fingerprint_differences(mine, theirs, f"{prefix}{key}.")
        elif mine != theirs:
            lines.append(f"{prefix}{key}: cache {show(mine)} != this run {show(theirs)}")
    return lines


__all__ = [
    "cached_part_trains",
    "describe_transform",
    "encoder_outputs",
    "feature_fingerprint",
    "fingerprint_differences",
    "frozen_features",
    "weights_digest",
]
