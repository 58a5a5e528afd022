"""MiniGPT-4 (Llama-2 variant) / MiniGPT-v2 as Hugging Face classes.

These models have no Q-Former: the ViT's patch tokens (CLS dropped) are grouped by
``merge_tokens`` (4 in the originals: 256 x 1408 -> 64 x 5632) and ONE Linear maps each group to
the LLM width. No transformers class has that projector, so we subclass Llava and keep its
whole contract (sub-configs, ``image_token_index``, scatter at the image tokens, the token-count
check, generation and cache); only the image-feature path and the projector differ. The classes
are registered with the Auto classes so ``AutoModelForImageTextToText.from_pretrained`` works
once ``mmalign.model`` is imported.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    Blip2VisionConfig,
    Blip2VisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    PreTrainedConfig,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import select_hidden_states

from mmalign.model.architectures import grid_side

PATCH_MERGES = ("sequential", "grid")


@strict
class MiniGPT4PatchConfig(LlavaConfig):
    """Llava's config plus how patch tokens are merged before the single Linear projector.

    ``patch_merge="sequential"`` is the originals' ``view(bs, n // 4, 4 * hidden)`` over
    consecutive raster-order tokens (for a 16x16 grid: 4 tokens of one row); ``"grid"`` groups
    ``s x s`` spatial neighbours (``merge_tokens == s * s``, square grid with side divisible by s).
    ``vision_feature_layer=None`` (default) uses the tower's ``last_hidden_state``: for
    ``Blip2VisionModel`` that includes ``post_layernorm`` == MiniGPT-4's ``ln_vision``, the
    originals' exact input, which ``hidden_states[-1]`` (pre-norm) is not; for CLIP both are
    equal. An int selects ``hidden_states[layer]`` like Llava.
    """

    model_type = "minigpt4_patch"

    sub_configs_defaults = {
        # EVA-CLIP ViT-g/14 at 224 px, as in MiniGPT-4 (HF's Blip2 vision tower)
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_2_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    image_seq_length: int = 64
    vision_feature_layer: int | None = None
    merge_tokens: int = 4
    patch_merge: Literal["sequential", "grid"] = "sequential"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.merge_tokens < 1:
            raise ValueError(f"merge_tokens must be >= 1, got {self.merge_tokens}")
        if self.patch_merge not in PATCH_MERGES:
            raise ValueError(f"patch_merge must be one of {PATCH_MERGES}, got {self.patch_merge!r}")
        if isinstance(self.vision_feature_layer, (list, tuple)):
            raise ValueError("minigpt4_patch takes one vision_feature_layer (an int) or None")
        side = grid_side(self.vision_config)
        n = side * side + (self.vision_feature_select_strategy == "full")  # CLS kept by "full"
        if n % self.merge_tokens:
            raise ValueError(f"{n} vision tokens do not split into groups of {self.merge_tokens}")
        if self.patch_merge == "grid":
            s = math.isqrt(self.merge_tokens)
            if n != side * side or s * s != self.merge_tokens or side % s:
                raise ValueError(
                    f"patch_merge='grid' needs merge_tokens = s*s with s dividing the grid side "
                    f"{side} (and CLS dropped); got merge_tokens={self.merge_tokens}"
                )


def merge_patches(features: torch.Tensor, merge_tokens: int, mode: str = "sequential") -> torch.Tensor:
    """(b, n, c) patch tokens in raster order -> (b, n // merge_tokens, merge_tokens * c)."""
    b, n, c = features.shape
    if n % merge_tokens:
        raise ValueError(f"{n} vision tokens do not split into groups of {merge_tokens}")
    if mode == "sequential":
        return features.reshape(b, n // merge_tokens, merge_tokens * c)
    if mode != "grid":
        raise ValueError(f"unknown patch_merge {mode!r}; expected one of {PATCH_MERGES}")
    side, s = math.isqrt(n), math.isqrt(merge_tokens)
    if side * side != n or s * s != merge_tokens or side % s:
        raise ValueError(f"grid merge needs a square grid divisible by {s}; got {n} tokens")
    x = features.reshape(b, side // s, s, side // s, s, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, n // merge_tokens, merge_tokens * c)


def vision_tower_from_config(config: PreTrainedConfig) -> nn.Module:
    """AutoModel has no entry for Blip2's vision config (MiniGPT-4's EVA ViT-g), so route it."""
    if isinstance(config, Blip2VisionConfig):
        return Blip2VisionModel._from_config(config)
    return AutoModel.from_config(config)


class MiniGPT4PatchProjector(nn.Module):
    """The originals' ``llama_proj``: one Linear on ``merge_tokens`` concatenated patch tokens."""

    def __init__(self, config: MiniGPT4PatchConfig):
        super().__init__()
        self.linear = nn.Linear(
            config.merge_tokens * config.vision_config.hidden_size,
            config.text_config.hidden_size,
            bias=config.multimodal_projector_bias,
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


class MiniGPT4PatchPreTrainedModel(LlavaPreTrainedModel):
    config: MiniGPT4PatchConfig
    config_class = MiniGPT4PatchConfig


class MiniGPT4PatchModel(MiniGPT4PatchPreTrainedModel, LlavaModel):
    """LlavaModel with the patch-merge projector; forward / scatter / count check are Llava's."""

    def __init__(self, config: MiniGPT4PatchConfig):
        LlavaPreTrainedModel.__init__(self, config)  # skip LlavaModel.__init__: other projector
        self.vision_tower = vision_tower_from_config(config.vision_config)
        self.multi_modal_projector = MiniGPT4PatchProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """Select layer, drop CLS ("default"), merge groups of patches, project."""
        if image_sizes is not None:
            raise ValueError("minigpt4_patch takes square images of the configured size only")
        outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        merged = self.select_features(outputs, vision_feature_layer, vision_feature_select_strategy)
        outputs.pooler_output = list(self.multi_modal_projector(merged))
        return outputs

    def select_features(
        self, outputs: BaseModelOutputWithPooling, layer: int | None, strategy: str | None
    ) -> torch.Tensor:
        """The tower's outputs -> the projector's input ``[n, tokens // merge, merge * width]``
        (what a feature cache stores: everything before it is frozen in MiniGPT-4's stages)."""
        feats = outputs.last_hidden_state if layer is None else outputs.hidden_states[layer]
        if strategy == "default":
            feats = feats[:, 1:]
        return merge_patches(feats, self.config.merge_tokens, self.config.patch_merge)


class MiniGPT4PatchForConditionalGeneration(MiniGPT4PatchPreTrainedModel, LlavaForConditionalGeneration):
    """Llava's LM head, loss, generation and cache over ``MiniGPT4PatchModel``."""

    def __init__(self, config: MiniGPT4PatchConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = MiniGPT4PatchModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


AutoConfig.register(MiniGPT4PatchConfig.model_type, MiniGPT4PatchConfig, exist_ok=True)
AutoModel.register(MiniGPT4PatchConfig, MiniGPT4PatchModel, exist_ok=True)
AutoModelForImageTextToText.register(MiniGPT4PatchConfig, MiniGPT4PatchForConditionalGeneration, exist_ok=True)

__all__ = [
    "MiniGPT4PatchConfig",
    "MiniGPT4PatchModel",
    "MiniGPT4PatchForConditionalGeneration",
    "merge_patches",
    "vision_tower_from_config",
]
