"""The image side of a model's processor: the eval transform for its vision tower.

MiniGPT-4 lineage (blip-2, minigpt4_patch): bicubic resize to a square + CLIP mean/std
(``BlipImageProcessor``); LLaVA: CLIP's shortest-edge resize + center crop. Which one an
architecture uses is its ``Architecture.image_resize``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import is_torchvision_available

from mmalign.model.architectures import architecture_of

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_processor_for(model_or_config: PreTrainedModel | PreTrainedConfig):
    """The eval-time transform for the vision tower at its configured size.

    MiniGPT-4 lineage (blip-2, minigpt4_patch): bicubic resize to a square + CLIP mean/std
    (BlipImageProcessor); LLaVA: CLIP's shortest-edge resize + center crop. Without torchvision
    (it does not import beside the local torch) the PIL-backed classes are used directly.
    """
    config = getattr(model_or_config, "config", model_or_config)
    vcfg = config.vision_config
    size = vcfg.image_size[0] if isinstance(vcfg.image_size, (list, tuple)) else vcfg.image_size
    siglip = "siglip" in vcfg.model_type
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if siglip else (CLIP_MEAN, CLIP_STD)
    tv = is_torchvision_available()
    if architecture_of(config).image_resize == "shortest_edge_crop" and not siglip:
        from transformers import CLIPImageProcessor, CLIPImageProcessorPil

        cls = CLIPImageProcessor if tv else CLIPImageProcessorPil
        return cls(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(mean),
            image_std=list(std),
        )
    from transformers import BlipImageProcessor, BlipImageProcessorPil

    cls = BlipImageProcessor if tv else BlipImageProcessorPil
    return cls(
        size={"height": size, "width": size},
        resample=3,  # PIL bicubic
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


class ImageTransform:
    """PIL image -> normalised ``[3, H, W]`` float tensor for the model's tower (picklable, so
    DataLoader workers can use it). ``pad_to_square`` pads with the mean colour first, as
    LLaVA-1.5 / ShareGPT4V stage 2 do, instead of cropping the image's sides away."""

    def __init__(self, processor: Any, pad_to_square: bool = False):
        self.processor, self.pad_to_square = processor, pad_to_square

    def __call__(self, image: Any) -> torch.Tensor:
        image = image.convert("RGB")
        if self.pad_to_square and image.width != image.height:
            from PIL import Image

            side = max(image.size)
            fill = tuple(int(255 * m) for m in self.processor.image_mean)  # CLIP: (122, 116, 104)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def image_transform_for(
    model_or_config: PreTrainedModel | PreTrainedConfig, pad_to_square: bool = False
) -> ImageTransform:
    """The eval transform of ``image_processor_for`` as a callable on one PIL image."""
    return ImageTransform(image_processor_for(model_or_config), pad_to_square)


__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageTransform", "image_processor_for", "image_transform_for"]
