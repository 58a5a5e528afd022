"""Model construction, loading, freezing policies and checkpoints. Importing this package
registers ``minigpt4_patch`` with the transformers Auto classes.

Where each concept lives: ``architectures`` (one entry per model_type), ``compose`` (build from
backbones), ``weights`` (read named tensors of a checkpoint), ``loading`` (exported folders, run
configs), ``bundle`` (``LoadedModel``: model + tokenizer + template + image transform),
``processing`` (image transforms), ``quantize`` (8/4-bit loading), ``freeze`` (what trains),
``checkpoint`` (trainable-only checkpoints, export), ``convert`` (the original checkpoints).
"""

from mmalign.model.architectures import (
    ARCHITECTURES,
    Architecture,
    architecture_of,
    check_image_tokens,
    num_image_tokens,
)
from mmalign.model.bundle import LoadedModel
from mmalign.model.checkpoint import export, load_trainable, save_trainable
from mmalign.model.compose import build_model
from mmalign.model.freeze import POLICIES, FreezeReport, apply_freeze, eval_frozen
from mmalign.model.loading import (
    image_transform_of,
    load_model,
    model_from_config,
    template_of,
    train_image_transform,
)
from mmalign.model.patch_model import (
    MiniGPT4PatchConfig,
    MiniGPT4PatchForConditionalGeneration,
    MiniGPT4PatchModel,
    merge_patches,
)
from mmalign.model.processing import TRANSFORMS, ImageTransform, image_processor_for, image_transform_for
from mmalign.model.quantize import quantization_config, weight_bytes
from mmalign.prompts import IMAGE_TOKEN
from mmalign.recipes import ModelSpec

__all__ = [
    "ARCHITECTURES",
    "IMAGE_TOKEN",
    "POLICIES",
    "TRANSFORMS",
    "Architecture",
    "FreezeReport",
    "ImageTransform",
    "LoadedModel",
    "MiniGPT4PatchConfig",
    "MiniGPT4PatchForConditionalGeneration",
    "MiniGPT4PatchModel",
    "ModelSpec",
    "apply_freeze",
    "architecture_of",
    "build_model",
    "check_image_tokens",
    "eval_frozen",
    "export",
    "image_processor_for",
    "image_transform_for",
    "image_transform_of",
    "load_model",
    "load_trainable",
    "merge_patches",
    "model_from_config",
    "num_image_tokens",
    "quantization_config",
    "save_trainable",
    "template_of",
    "train_image_transform",
    "weight_bytes",
]
