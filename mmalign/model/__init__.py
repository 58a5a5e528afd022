"""Model construction, freezing policies and checkpoints. Importing this package registers
``minigpt4_patch`` with the transformers Auto classes."""

from mmalign.model.build import (
    ModelSpec,
    build_model,
    check_image_tokens,
    image_processor_for,
    image_transform_for,
    load_model,
    model_from_config,
    num_image_tokens,
    quantization_config,
    template_of,
    weight_bytes,
)
from mmalign.model.checkpoint import export, load_trainable, save_trainable
from mmalign.model.freeze import POLICIES, FreezeReport, apply_freeze, eval_frozen
from mmalign.model.patch_model import (
    MiniGPT4PatchConfig,
    MiniGPT4PatchForConditionalGeneration,
    MiniGPT4PatchModel,
    merge_patches,
)
from mmalign.prompts import IMAGE_TOKEN

__all__ = [
    "IMAGE_TOKEN",
    "POLICIES",
    "FreezeReport",
    "MiniGPT4PatchConfig",
    "MiniGPT4PatchForConditionalGeneration",
    "MiniGPT4PatchModel",
    "ModelSpec",
    "apply_freeze",
    "build_model",
    "check_image_tokens",
    "eval_frozen",
    "export",
    "image_processor_for",
    "image_transform_for",
    "model_from_config",
    "template_of",
    "load_model",
    "load_trainable",
    "merge_patches",
    "num_image_tokens",
    "quantization_config",
    "save_trainable",
    "weight_bytes",
]
