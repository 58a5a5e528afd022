"""A model ready to answer: the model, its tokenizer, the chat template it was trained with and
the eval image transform it was trained for (recorded by ``export``), kept together.

A text-only causal LM folder loads too (no image transform, no image tokens): the curation
pipeline's fix model is served and called like any chat model, and refuses images.

Every front end takes one: the chat session, the API server, the web demo, evaluation, the
lmms-eval adapter, the toy main job and the CLI. Loading is one call (``LoadedModel.load``), so
the four parts can never come from different folders or disagree on the template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmalign.model.architectures import Architecture, architecture_of, num_image_tokens
from mmalign.model.loading import MMALIGN_META, image_transform_of, load_model, template_of
from mmalign.model.processing import ImageTransform, check_transform, image_transform_for
from mmalign.prompts import Template, get_template


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16`` (None stays None: the checkpoint's own dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    return value


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    template: str | Template  # a mmalign.prompts template (name or object)
    image_transform: ImageTransform | None  # None: a text-only LLM
    name: str = ""  # the folder / hub id it came from (or a recipe name)

    def __post_init__(self) -> None:
        get_template(self.template)  # an unknown template fails here, not at the first answer

    @classmethod
    def load(
        cls,
        path_or_id: str | Path,
        *,
        template: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        attn_implementation: str | None = None,
        load_in: str | None = None,
        image_transform: str | None = None,
    ) -> LoadedModel:
        """An exported folder / hub id with its recorded template and eval image transform
        (``template`` / ``image_transform`` override them)."""
        if is_text_only(path_or_id):
            return cls._load_text_only(path_or_id, template, dtype, device, attn_implementation)
        model, tokenizer = load_model(
            str(path_or_id),
            dtype=torch_dtype(dtype),
            device=device,
            attn_implementation=attn_implementation,
            load_in=load_in,
        )
        template = template or template_of(path_or_id)
        transform = image_transform or image_transform_of(path_or_id)
        return cls.of(model, tokenizer, template, name=str(path_or_id), image_transform=transform)

    @classmethod
    def _load_text_only(
        cls,
        path: str | Path,
        template: str | None,
        dtype: str | torch.dtype | None,
        device: str | torch.device,
        attn_implementation: str | None = None,
    ) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        meta = Path(path) / MMALIGN_META
        template = template or (json.loads(meta.read_text()).get("template") if meta.is_file() else None)
        if not template:
            raise ValueError(f"{path}: a text-only LLM needs its chat template (--template, or {MMALIGN_META})")
        attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype) or "auto", **attn).to(device)
        return cls(model, AutoTokenizer.from_pretrained(str(path)), template, None, str(path))

    @classmethod
    def of(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        template: str,
        name: str = "",
        image_transform: str | None = None,
    ) -> LoadedModel:
        """A model already in memory (built from a recipe, or just trained); ``image_transform``
        is an eval transform's name (default: the architecture's)."""
        if _config_is_text_only(model.config):
            return cls(model, tokenizer, template, None, name)
        transform = image_transform_for(model, check_transform(image_transform) if image_transform else None)
        return cls(model, tokenizer, template, transform, name)

    @property
    def text_only(self) -> bool:
        return self.image_transform is None

    @property
    def architecture(self) -> Architecture:
        return architecture_of(self.model)

    @property
    def num_image_tokens(self) -> int:
        return 0 if self.text_only else num_image_tokens(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixel_values(self, images: list[Any]) -> torch.Tensor:
        """PIL images -> one ``[N, 3, H, W]`` batch on the model's device and dtype."""
        if self.image_transform is None:
            raise ValueError(f"{self.name or 'this model'} is a text-only LLM: it takes no images")
        return torch.stack([self.image_transform(im) for im in images]).to(self.device, self.dtype)


def _config_is_text_only(config: Any) -> bool:
    return getattr(config, "vision_config", None) is None


def is_text_only(path_or_id: str | Path) -> bool:
    """A causal LM folder (no vision tower in its config) rather than a vision-language model."""
    from transformers import AutoConfig

    return _config_is_text_only(AutoConfig.from_pretrained(str(path_or_id)))


__all__ = ["LoadedModel", "is_text_only", "torch_dtype"]
