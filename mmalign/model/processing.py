"""The image side of a model's processor: the train and eval transforms, named, as data.

A transform is a name a recipe, a stage config (``data.train_transform`` / ``data.eval_transform``)
and an exported folder (``mmalign.json``) record:

- ``resize``: bicubic resize to the tower's square (MiniGPT-4's ``blip2_image_eval``)
- ``center_crop``: shortest edge to the tower's size, then a center crop (CLIP's, llava-hf's)
- ``pad_to_square``: pad to a square with the mean colour, then CLIP's (LLaVA-1.5 / ShareGPT4V ``pad``)
- ``random_resized_crop``: a random crop (scale 0.5-1.0, aspect 3/4-4/3) resized bicubic
  (MiniGPT-4's ``blip2_image_train``)

All normalise with the tower's mean / std (CLIP's, SigLIP's 0.5).

The eval transforms are Hugging Face image processors (``BlipImageProcessor``,
``CLIPImageProcessor``, ``LlavaImageProcessor(do_pad=True)``), so the processor an exported folder
carries gives the pixels mmalign's chat and evaluation give. ``random_resized_crop`` is training
only: no HF processor draws random crops.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import is_torchvision_available

from mmalign.model.architectures import architecture_of

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRANSFORMS = ("resize", "center_crop", "pad_to_square", "random_resized_crop")
EVAL_TRANSFORMS = ("resize", "center_crop", "pad_to_square")
CROP_SCALE = (0.5, 1.0)  # MiniGPT-4's min_scale / max_scale
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default


def default_eval_transform(model_or_config: PreTrainedModel | PreTrainedConfig) -> str:
    """The architecture's eval transform; SigLIP towers resize to a square (SigLIP's own
    processor does not crop)."""
    config = getattr(model_or_config, "config", model_or_config)
    if "siglip" in config.vision_config.model_type:
        return "resize"
    return architecture_of(config).eval_transform


def check_transform(name: str, *, train: bool = False) -> str:
    allowed = TRANSFORMS if train else EVAL_TRANSFORMS
    if name not in allowed:
        raise ValueError(f"unknown {'train' if train else 'eval'} image transform {name!r}; known: {allowed}")
    return name


def image_processor_for(model_or_config: PreTrainedModel | PreTrainedConfig, transform: str | None = None):
    """The HF image processor of ``transform`` (default: the architecture's eval transform) at
    the tower's size. ``random_resized_crop`` gets the ``resize`` processor, which resizes its
    crops. Without torchvision (it does not import beside the local torch) the PIL-backed classes
    are used; both save under the same ``image_processor_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    transform = check_transform(transform or default_eval_transform(config), train=True)
    vcfg = config.vision_config
    size = vcfg.image_size[0] if isinstance(vcfg.image_size, (list, tuple)) else vcfg.image_size
    siglip = "siglip" in vcfg.model_type
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if siglip else (CLIP_MEAN, CLIP_STD)
    common = dict(image_mean=list(mean), image_std=list(std), resample=3, do_convert_rgb=True)  # 3: PIL bicubic
    if transform in ("center_crop", "pad_to_square"):
        # LLaVA's expand2square pads with the mean colour (CLIP: 122, 116, 104), as do_pad does
        cls = _processor_class("LlavaImageProcessor" if transform == "pad_to_square" else "CLIPImageProcessor")
        pad = {"do_pad": True} if transform == "pad_to_square" else {}
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **pad, **common)
    return _processor_class("BlipImageProcessor")(size={"height": size, "width": size}, **common)


def _processor_class(name: str) -> type:
    import transformers

    return getattr(transformers, name if is_torchvision_available() else name + "Pil")


def random_crop_box(size: tuple[int, int], scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """A (left, top, right, bottom) box as torchvision's ``RandomResizedCrop`` draws it: area a
    ``scale`` share of the image, aspect log-uniform in ``ratio``, ten tries, then the central crop.

    Drawn from the global torch RNG: the training loop seeds and checkpoints it (exact resume),
    and torch reseeds it in each DataLoader worker."""
    width, height = size
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)))
            left = int(torch.randint(0, width - w + 1, (1,)))
            return left, top, left + w, top + h
    w, h = width, height  # the whole image, narrowed to the nearest allowed aspect
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageTransform:
    """PIL image -> normalised ``[3, H, W]`` float tensor for the model's tower (picklable, so
    DataLoader workers can use it): one of ``TRANSFORMS`` by name."""

    def __init__(self, processor: Any, name: str = "resize"):
        self.processor, self.name = processor, check_transform(name, train=True)

    def __call__(self, image: Any) -> torch.Tensor:
        image = image.convert("RGB")
        if self.name == "random_resized_crop":
            image = image.crop(random_crop_box(image.size))
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"ImageTransform({self.name!r}, {type(self.processor).__name__})"


def image_transform_for(
    model_or_config: PreTrainedModel | PreTrainedConfig, transform: str | None = None
) -> ImageTransform:
    """``transform`` (default: the architecture's eval transform) as a callable on one PIL image."""
    name = transform or default_eval_transform(model_or_config)
    return ImageTransform(image_processor_for(model_or_config, name), name)


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "EVAL_TRANSFORMS",
    "TRANSFORMS",
    "ImageTransform",
    "check_transform",
    "default_eval_transform",
    "image_processor_for",
    "image_transform_for",
    "random_crop_box",
]
