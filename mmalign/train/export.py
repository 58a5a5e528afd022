"""A training checkpoint (trainable tensors only) -> a full Hugging Face folder users load."""

from __future__ import annotations

from pathlib import Path

from mmalign.config import RunConfig


def export_checkpoint(cfg: RunConfig, checkpoint: str | Path, out: str | Path) -> Path:
    """Build the stage's model as ``cfg`` describes it, load ``checkpoint``'s trainable tensors
    and write the folder with the stage's chat template and eval image transform (LoRA adapters
    merged into the weights).
    ``cfg`` should have its recipe defaults filled in (``config.with_recipe_defaults``)."""
    from mmalign.model import apply_freeze, export, load_trainable, model_from_config
    from mmalign.model.loading import eval_transform_name

    model, tokenizer = model_from_config(cfg.model)
    if cfg.train.lora_r:  # the checkpoint holds LoRA adapters: put them on; export merges them
        from mmalign.train.lora import apply_lora

        apply_freeze(model, cfg.train.trainable)
        apply_lora(model, cfg.train)
    load_trainable(model, checkpoint, strict=False)
    return export(model, tokenizer, out, template=cfg.data.template, image_transform=eval_transform_name(cfg))
