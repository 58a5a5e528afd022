"""Load a finished model: an exported folder / hub id, or what a run config describes.

``load_model`` reads any folder ``export`` writes (Blip2, Llava, ``minigpt4_patch``), optionally
quantizing the LLM; ``model_from_config`` builds from a recipe's backbones or loads ``model.path``;
``template_of`` / ``image_transform_of`` are the chat template and eval image transform a folder
was trained with; ``train_image_transform`` is what a stage's training data goes through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mmalign.model import patch_model  # noqa: F401  (registers minigpt4_patch with the Auto classes)
from mmalign.model.architectures import architecture_of
from mmalign.model.compose import build_model
from mmalign.model.processing import ImageTransform, check_transform, image_transform_for
from mmalign.model.quantize import quantization_config
from mmalign.prompts import IMAGE_TOKEN
from mmalign.recipes import get_recipe, with_backbones


def load_model(
    path_or_id: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    load_in: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an exported folder / hub id (any of the three archs) and its tokenizer.

    ``load_in="8bit"|"4bit"`` quantizes the LLM's linear layers on load (see
    ``quantization_config``); the vision side and the LM head keep ``dtype``."""
    kwargs: dict[str, Any] = {"dtype": dtype or "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in:
        config = AutoConfig.from_pretrained(path_or_id)
        kwargs["quantization_config"] = quantization_config(config, load_in, device, dtype)
        model = AutoModelForImageTextToText.from_pretrained(path_or_id, device_map={"": str(device)}, **kwargs)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path_or_id, **kwargs).to(device)
    tok = AutoTokenizer.from_pretrained(path_or_id)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if IMAGE_TOKEN not in tok.all_special_tokens or image_id != model.config.image_token_index:
        raise ValueError(
            f"{path_or_id}: tokenizer's {IMAGE_TOKEN!r} (id {image_id}) does not match "
            f"config.image_token_index={model.config.image_token_index}"
        )
    return model, tok


def model_from_config(cfg: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build or load from a ``mmalign.config.ModelConfig``: ``path`` (a folder / hub id to
    continue from) wins over ``recipe`` (backbones composed fresh); ``dtype`` is a torch name."""
    dtype = getattr(torch, cfg.dtype) if isinstance(cfg.dtype, str) else cfg.dtype
    kwargs = dict(dtype=dtype, device=cfg.device, attn_implementation=cfg.attn_implementation)
    quantization = getattr(cfg, "quantization", None)
    if cfg.path:
        return load_model(cfg.path, **kwargs, load_in=quantization)
    if quantization:
        raise ValueError("model.quantization loads a finished folder: set model.path (export the stage-1 model first)")
    if not cfg.recipe:
        raise ValueError("model config needs `recipe` or `path`")
    recipe = with_backbones(get_recipe(cfg.recipe), getattr(cfg, "vision", None), getattr(cfg, "llm", None))
    return build_model(recipe.spec, **kwargs)


MMALIGN_META = "mmalign.json"  # written by ``export``: the chat template and eval transform a folder was trained with


def _recorded(path_or_id: str | Path, key: str) -> Any:
    meta = Path(path_or_id) / MMALIGN_META
    return json.loads(meta.read_text()).get(key) if meta.is_file() else None


def template_of(path_or_id: str | Path) -> str:
    """The chat template recorded by ``export``, else the published default for the architecture."""
    return (
        _recorded(path_or_id, "template")
        or architecture_of(AutoConfig.from_pretrained(str(path_or_id))).default_template
    )


def image_transform_of(path_or_id: str | Path) -> str | None:
    """The eval image transform recorded by ``export`` (None: not recorded, the architecture's)."""
    name = _recorded(path_or_id, "image_transform")
    return None if name is None else check_transform(name)


def eval_transform_name(cfg: Any) -> str | None:
    """A stage's eval transform (a ``RunConfig``): ``data.eval_transform``, else the one
    ``model.path``'s folder records (None: the architecture's)."""
    return cfg.data.eval_transform or (image_transform_of(cfg.model.path) if cfg.model.path else None)


def train_image_transform(model: PreTrainedModel, cfg: Any) -> ImageTransform:
    """What a stage's training data goes through: ``data.train_transform``, else its eval transform."""
    return image_transform_for(model, cfg.data.train_transform or eval_transform_name(cfg))


__all__ = [
    "MMALIGN_META",
    "eval_transform_name",
    "image_transform_of",
    "load_model",
    "model_from_config",
    "template_of",
    "train_image_transform",
]
