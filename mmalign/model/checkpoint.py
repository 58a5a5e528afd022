"""Training checkpoints hold only what trains; ``export`` writes a full plain-HF folder.

A training checkpoint is a folder:
  ``trainable.safetensors``  the tensors with ``requires_grad`` (MiniGPT-4 stage 2: ~4M, not 7B)
  ``trainable.json``         model_type + name -> shape, to say what is missing / unexpected
  ``state.pt``               ``extra`` (optimizer, scheduler, step, config ...), if given
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaProcessor, PreTrainedModel, PreTrainedTokenizerBase

from mmalign.model.loading import MMALIGN_META
from mmalign.model.processing import image_processor_for
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
) -> Path:
    """Write a complete folder (config, safetensors, tokenizer, preprocessor) that
    ``from_pretrained`` loads: plain transformers for blip-2 / llava (a ``LlavaProcessor`` is
    written too, so ``AutoProcessor`` and vLLM work); ``import mmalign.model`` for
    minigpt4_patch. ``template`` (the chat template trained with) goes to ``mmalign.json``, and
    a chat template, as Jinja, to the tokenizer / processor. ``max_shard_size`` (e.g. "5GB")
    shards the safetensors (default: transformers')."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = merge_lora(model)  # a LoRA-trained model is exported as plain weights
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    jinja = None
    if template is not None:
        (out / MMALIGN_META).write_text(json.dumps({"template": template}, indent=1))
        jinja = chat_template(template) if get_template(template).chat else None
    image_processor = image_processor or image_processor_for(model)
    config = model.config
    if config.model_type == "llava":
        vcfg = config.vision_config
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=vcfg.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_token=IMAGE_TOKEN,
            # the CLS token a CLIP tower emits (dropped by "default"); SigLIP has none
            num_additional_image_tokens=0 if "siglip" in vcfg.model_type else 1,
            chat_template=jinja,
        )
        processor.save_pretrained(out)
    else:
        saved, tokenizer.chat_template = tokenizer.chat_template, jinja or tokenizer.chat_template
        try:  # set only for the save: the caller's tokenizer is left as it was
            tokenizer.save_pretrained(out)
        finally:
            tokenizer.chat_template = saved
        image_processor.save_pretrained(out)
    return out


__all__ = ["save_trainable", "save_tensors", "load_trainable", "merge_lora", "export"]
