"""Training checkpoints hold only what trains; ``export`` writes a full plain-HF folder.

A training checkpoint is a folder:
  ``trainable.safetensors``  the tensors with ``requires_grad`` (MiniGPT-4 stage 2: ~4M, not 7B)
  ``trainable.json``         model_type + name -> shape, to say what is missing / unexpected
  ``state.pt``               ``extra`` (optimizer, scheduler, step, config ...), if given
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlavaProcessor, PreTrainedModel, PreTrainedTokenizerBase

from mmalign.model.architectures import architecture_of, grid_side, num_image_tokens
from mmalign.model.loading import MMALIGN_META
from mmalign.model.processing import check_transform, default_eval_transform, image_processor_for
from mmalign.prompts import IMAGE_TOKEN, chat_template, get_template

WEIGHTS, META, STATE = "trainable.safetensors", "trainable.json", "state.pt"


def save_trainable(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the trainable tensors (+ ``extra`` via torch.save) to the folder ``path``."""
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return save_tensors(tensors, path, model_type, extra)


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, model_type: str | None, extra: dict[str, Any] | None = None
) -> Path:
    """``save_trainable`` for tensors already gathered (from FSDP / DeepSpeed shards)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not tensors:
        raise ValueError("no parameter requires grad: nothing to save (apply_freeze first?)")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path / WEIGHTS))
    meta = {"model_type": model_type, "tensors": {n: list(t.shape) for n, t in tensors.items()}}
    (path / META).write_text(json.dumps(meta, indent=1))
    if extra:
        torch.save(extra, path / STATE)
    return path


def load_trainable(model: nn.Module, path: str | Path, *, strict: bool = True) -> dict[str, Any]:
    """Load tensors saved by ``save_trainable`` into ``model``; returns ``extra`` ({} if none).

    Every saved tensor must exist in the model with the same shape (else nothing would be lost
    silently); ``strict`` also requires every parameter that currently requires grad to be in
    the file (so apply the same freeze policy first). ``strict=False`` initialises a later stage
    whose trainable set is larger than the earlier one's.
    """
    path = Path(path)
    saved = load_file(str(path / WEIGHTS))
    params = dict(model.named_parameters())
    unexpected = sorted(set(saved) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved)
    if unexpected or (strict and missing):  # a saved tensor with nowhere to go is always an error
        raise KeyError(
            f"{path}: checkpoint does not match the model's trainable parameters; "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            if name not in params:
                continue
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    state = path / STATE
    # weights_only: optimizer / scheduler state dicts are plain containers of tensors and numbers
    return torch.load(state, map_location="cpu", weights_only=True) if state.exists() else {}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into their base Linear layers (peft's merge) and drop the wrappers, so
    the model is a plain HF model again; a model without LoRA comes back unchanged."""
    if "peft" not in sys.modules:  # peft never imported: no LoRA layer can exist (and export stays fast)
        return model
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model


def export(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    image_processor: Any = None,
    template: str | None = None,
    max_shard_size: int | str | None = None,
    image_transform: str | None = None,
) -> Path:
    """Write a complete folder that plain transformers (blip-2, llava; ``import mmalign.model``
    for minigpt4_patch) and vLLM (llava) load as the published checkpoints of the class load.

    ``template`` (default: the architecture's) and ``image_transform`` (the eval transform,
    default: the architecture's) go to ``mmalign.json`` for mmalign's own loaders; the processor
    gets the same transform and a Jinja chat template, so ``processor.apply_chat_template`` ->
    ``processor(images=..., text=...)`` -> ``generate`` gives mmalign's ids (exactly one BOS) and
    pixels. ``max_shard_size`` (e.g. "5GB") shards the safetensors (default: transformers')."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = merge_lora(model)  # a LoRA-trained model is exported as plain weights
    template = template or architecture_of(model).default_template
    transform = check_transform(image_transform or default_eval_transform(model))
    _name_text_architecture(model.config)
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, state_dict=published_state_dict(model), **shards)
    (out / MMALIGN_META).write_text(json.dumps({"template": template, "image_transform": transform}, indent=1))
    image_processor = image_processor or image_processor_for(model, transform)
    processor = hf_processor(model.config, _without_own_bos(tokenizer), image_processor, template)
    processor.save_pretrained(out)
    return out


# transformers 5 builds CLIP / SigLIP vision models without their `vision_model` level (and puts it
# back only when saving a model it loaded itself); llava-hf's published checkpoints have it, and so
# does vLLM, which refuses `vision_tower.embeddings.*`
NESTED_TOWERS = {"clip_vision_model": "vision_model.", "siglip_vision_model": "vision_model."}


def published_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict under the names of the published checkpoints of the class (llava-hf:
    ``vision_tower.vision_model.*``), before transformers' own save-time renames."""
    state = model.state_dict()
    prefix = architecture_of(model).tower_prefix
    level = NESTED_TOWERS.get(model.config.vision_config.model_type)
    if prefix is None or level is None or any(k.startswith(prefix + level) for k in state):
        return state
    return {(prefix + level + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def _name_text_architecture(config: Any) -> None:
    """``text_config.architectures`` (vLLM and other loaders resolve the text model from it)."""
    text = config.get_text_config()
    if not getattr(text, "architectures", None):
        text.architectures = [AutoModelForCausalLM._model_mapping[type(text)].__name__]


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _without_own_bos(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy that does not add BOS itself: the chat template writes it, because vLLM tokenizes
    chat prompts with ``add_special_tokens=False``, so a processor call must not add a second."""
    tokenizer = copy.deepcopy(tokenizer)  # the caller's is left as it was (processors change theirs too)
    if _adds_bos(tokenizer):
        tokenizer.add_bos_token = False  # rebuilds the post-processor without BOS
        tokenizer.init_kwargs["add_bos_token"] = False
        if _adds_bos(tokenizer):
            raise ValueError(f"{type(tokenizer).__name__} still adds BOS with add_bos_token=False")
    return tokenizer


def hf_processor(config: Any, tokenizer: PreTrainedTokenizerBase, image_processor: Any, template: str) -> Any:
    """The processor plain transformers and vLLM use: a ``LlavaProcessor`` for every architecture,
    which expands the chat template's one ``IMAGE_TOKEN`` per image in place to the model's count.

    Not ``Blip2Processor``: with ``num_query_tokens`` it puts the queries before BOS, not inside
    MiniGPT-4's ``<Img>...</Img>``, and in transformers 5.24 it drops its chat template on load."""
    jinja = chat_template(template) if get_template(template).chat else None
    return LlavaProcessor(
        image_processor, tokenizer, image_token=IMAGE_TOKEN, chat_template=jinja, **_llava_geometry(config)
    )


def _llava_geometry(config: Any) -> dict[str, Any]:
    """LlavaProcessor's settings for the model's image-token count, which it computes as
    ``(side / patch_size)**2 + num_additional_image_tokens - (strategy == "default")``.

    Llava: the tower's patch grid (+ CLS, dropped by "default"); minigpt4_patch: the merged grid
    (4 joined tokens = patches twice as wide). Blip2's count is its ``num_query_tokens``, not a grid:
    the whole image as one patch, plus ``num_query_tokens`` additional tokens."""
    vcfg = config.vision_config
    n = num_image_tokens(config)
    cls_token = 0 if "siglip" in vcfg.model_type else 1  # CLIP / EVA emit CLS
    side = math.isqrt(getattr(config, "merge_tokens", 1))
    patch = vcfg.patch_size[0] if isinstance(vcfg.patch_size, (list, tuple)) else vcfg.patch_size
    strategy = getattr(config, "vision_feature_select_strategy", None)
    if strategy and (grid_side(vcfg) // side) ** 2 + cls_token - (strategy == "default") == n:
        return dict(
            patch_size=patch * side, vision_feature_select_strategy=strategy, num_additional_image_tokens=cls_token
        )
    image_size = vcfg.image_size[0] if isinstance(vcfg.image_size, (list, tuple)) else vcfg.image_size
    return dict(patch_size=image_size, vision_feature_select_strategy="default", num_additional_image_tokens=n)


__all__ = [
    "export",
    "hf_processor",
    "load_trainable",
    "merge_lora",
    "published_state_dict",
    "save_tensors",
    "save_trainable",
]
