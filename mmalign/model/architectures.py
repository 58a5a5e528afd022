"""One entry per architecture (per Hugging Face ``model_type``): every fact the rest of mmalign
needs to know about it, in one place. Adding an architecture is one new ``Architecture``.

The facts: where each part's parameters live (freezing policies, per-part learning rates, LoRA
targets), which modules stay in full precision when the LLM is quantized, the published chat
template, how many image tokens one image takes, the default eval image transform, where conversion
writes each part, where the published checkpoints keep the vision tower, whether the class's own
``generate`` can continue a prefilled cache, what a feature cache stores (the projector's input:
what the frozen part computes) and how packed rows keep samples apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

ROLES = ("vision", "qformer", "projector", "llm")


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.model_type of the HF class
    name: str  # the recipe-side name (ModelSpec.arch)
    roles: Mapping[str, tuple[str, ...]]  # role -> parameter-name prefixes
    full_precision: tuple[str, ...]  # modules kept unquantized by --load-in (name prefix or suffix)
    default_template: str  # the published chat template
    conversion_prefixes: Mapping[str, str]  # convert.py's {vision} {projector} {text} {lm_head}
    count_image_tokens: Callable[[Any], int]  # config -> IMAGE_TOKEN copies per image
    eval_transform: Literal["resize", "center_crop"]  # the default eval image transform (processing.py)
    # the frozen part a feature cache replaces: image -> the projector's input, [n, tokens, width]
    cached_roles: tuple[str, ...]
    frozen_features: Callable[[Any, Any], Any]  # (model, pixel_values) -> features
    # (model, features) -> the projected image embeddings as the class's forward takes them in
    # `mm_encoder_outputs["image"].pooler_output`
    project_features: Callable[[Any, Any], Any]
    feature_settings: Callable[[Any], dict]  # config -> the fields that decide the features
    # packed rows: "position_ids" (restarting positions; transformers derives the block mask when
    # attention_mask is None and no cache is built) or "block_mask" (a 4-D additive mask: Blip2's
    # forward replaces a missing mask by ones, so position ids alone would mix the samples)
    packed_attention: Literal["position_ids", "block_mask"]
    # where the vision tower's tensors sit in an exported checkpoint, when the published layout
    # (llava-hf, which vLLM reads) nests them one level deeper than transformers 5 builds them
    tower_prefix: str | None = None
    # Blip2's generate() scatters the given images over *every* image token of the sequence, so it
    # cannot continue a cache that already holds earlier images (chat.generate works around it)
    generate_continues_cache: bool = True


def grid_side(vision_config: Any) -> int:
    """Patches per side of the (square) image the tower was configured for."""
    size, patch = vision_config.image_size, vision_config.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return size // patch


def _patch_tokens(config: Any) -> int:
    """Patch tokens of the tower, plus CLS when the strategy keeps it ("full")."""
    side = grid_side(config.vision_config)
    return side * side + (1 if config.vision_feature_select_strategy == "full" else 0)


def _qformer_queries(model: Any, pixel_values: Any) -> Any:
    """MiniGPT-4: ViT -> ln_vision -> Q-Former; the query outputs, cast as Blip2's forward casts them."""
    out = model.get_image_features(pixel_values, return_dict=True)
    return out.qformer_outputs.last_hidden_state.to(out.last_hidden_state.dtype)


def _llava_selected(model: Any, pixel_values: Any) -> Any:
    """LLaVA: ``hidden_states[vision_feature_layer]`` (a list of layers concatenated), CLS dropped
    by the "default" strategy, as ``LlavaModel.get_image_features`` selects before its projector."""
    config = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
    layers = config.vision_feature_layer
    picked = [hidden[i] for i in (layers if isinstance(layers, (list, tuple)) else [layers])]
    if config.vision_feature_select_strategy == "default":
        picked = [h[:, 1:] for h in picked]
    if len(picked) == 1:
        return picked[0]
    import torch  # this module stays light: torch only once a model exists

    return torch.cat(picked, dim=-1)


def _patch_selected(model: Any, pixel_values: Any) -> Any:
    config = model.config
    layer = config.vision_feature_layer
    outputs = model.model.vision_tower(pixel_values, output_hidden_states=layer is not None, return_dict=True)
    return model.model.select_features(outputs, layer, config.vision_feature_select_strategy)


def _vision_settings(config: Any) -> dict:
    vision = config.vision_config
    return {"model_type": vision.model_type, "image_size": vision.image_size, "patch_size": vision.patch_size}


def _llava_settings(config: Any) -> dict:
    return {
        **_vision_settings(config),
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }


_LLAVA_ROLES = {
    "vision": ("model.vision_tower.",),
    "qformer": (),
    "projector": ("model.multi_modal_projector.",),
    "llm": ("model.language_model.", "lm_head."),
}
_LLAVA_FULL_PRECISION = ("model.vision_tower", "model.multi_modal_projector", "lm_head")

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            model_type="blip-2",
            name="minigpt4",  # MiniGPT-4: EVA ViT-g + Q-Former + one Linear + Vicuna
            roles={
                "vision": ("vision_model.",),
                "qformer": ("qformer.", "query_tokens"),
                "projector": ("language_projection.",),
                "llm": ("language_model.",),
            },
            full_precision=("vision_model", "qformer", "language_projection", "language_model.lm_head"),
            default_template="minigpt4_v0",
            conversion_prefixes={
                "vision": "vision_model.",
                "projector": "language_projection.",
                "text": "language_model.model.",
                "lm_head": "language_model.lm_head.weight",
            },
            count_image_tokens=lambda config: config.num_query_tokens,
            eval_transform="resize",  # blip2_image_eval
            cached_roles=("vision", "qformer"),
            frozen_features=_qformer_queries,
            project_features=lambda model, features: model.language_projection(features),
            feature_settings=lambda config: {**_vision_settings(config), "num_query_tokens": config.num_query_tokens},
            packed_attention="block_mask",
            generate_continues_cache=False,
        ),
        Architecture(
            model_type="minigpt4_patch",
            name="minigpt4_patch",  # MiniGPT-4 Llama-2 / MiniGPT-v2: patch tokens, 4 joined, one Linear
            roles=_LLAVA_ROLES,
            full_precision=_LLAVA_FULL_PRECISION,
            default_template="llama2",
            conversion_prefixes={
                "vision": "model.vision_tower.",
                "projector": "model.multi_modal_projector.linear.",
                "text": "model.language_model.",
                "lm_head": "lm_head.weight",
            },
            count_image_tokens=lambda config: _patch_tokens(config) // config.merge_tokens,
            eval_transform="resize",
            cached_roles=("vision",),
            frozen_features=_patch_selected,
            project_features=lambda model, features: list(model.model.multi_modal_projector(features)),
            feature_settings=lambda config: {
                **_llava_settings(config),
                "merge_tokens": config.merge_tokens,
                "patch_merge": config.patch_merge,
            },
            packed_attention="position_ids",
        ),
        Architecture(
            model_type="llava",
            name="llava",  # LLaVA-1.5 / ShareGPT4V: CLIP ViT-L/336, layer -2, MLP, Vicuna v1.5
            roles=_LLAVA_ROLES,
            full_precision=_LLAVA_FULL_PRECISION,
            default_template="vicuna_v1",
            conversion_prefixes={
                "vision": "model.vision_tower.",
                "projector": "model.multi_modal_projector.",
                "text": "model.language_model.",
                "lm_head": "lm_head.weight",
            },
            count_image_tokens=_patch_tokens,
            eval_transform="center_crop",  # llava-hf's CLIPImageProcessor
            tower_prefix="model.vision_tower.",  # -> vision_tower.vision_model.* as llava-hf/llava-1.5-7b-hf
            cached_roles=("vision",),
            frozen_features=_llava_selected,
            project_features=lambda model, features: list(model.model.multi_modal_projector(features)),
            feature_settings=_llava_settings,
            packed_attention="position_ids",
        ),
    )
}
ARCHITECTURE_NAMES = tuple(a.name for a in ARCHITECTURES.values())


def architecture_of(model_or_config: Any) -> Architecture:
    """The entry for a model, a config, or a ``model_type`` string."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        model_type = getattr(getattr(model_or_config, "config", model_or_config), "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(f"unsupported model_type {model_type!r}; known: {sorted(ARCHITECTURES)}") from None


def architecture_named(name: str) -> Architecture:
    """The entry for a recipe's architecture name (``ModelSpec.arch``: minigpt4, minigpt4_patch, llava)."""
    for arch in ARCHITECTURES.values():
        if arch.name == name:
            return arch
    raise ValueError(f"unknown arch {name!r}; expected one of {ARCHITECTURE_NAMES}")


def num_image_tokens(config: Any) -> int:
    """How many ``IMAGE_TOKEN`` copies one image takes in the prompt."""
    return architecture_of(config).count_image_tokens(config)


def check_image_tokens(input_ids: Any, num_images: int, config: Any) -> None:
    """Raise if the prompt's image tokens disagree with the images. Blip2 needs this: its
    ``masked_scatter`` silently uses a prefix of the features when the counts differ."""
    found = int((input_ids == config.image_token_index).sum())
    per_image = num_image_tokens(config)
    if found != num_images * per_image:
        raise ValueError(
            f"input_ids hold {found} image tokens but {num_images} image(s) x {per_image} tokens "
            f"= {num_images * per_image} were expected"
        )


__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_NAMES",
    "ROLES",
    "Architecture",
    "architecture_named",
    "architecture_of",
    "check_image_tokens",
    "grid_side",
    "num_image_tokens",
]
