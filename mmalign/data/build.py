"""Assemble a training dataset from a `DataConfig`: read the records, pick the encoder."""

from __future__ import annotations

from typing import Any, Callable

from mmalign.config import DataConfig
from mmalign.data.sources import (
    MultimodalDataset,
    SkipCounter,
    make_caption_encoder,
    make_conversation_encoder,
    read_caption_json,
    read_llava_json,
)


def _looks_like_llava(path: str) -> bool:
    """LLaVA JSON is a list of records with "conversations"; peek instead of parsing twice."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16)
    return head.lstrip().startswith("[") and '"conversations"' in head


def dataset_from_config(
    cfg: DataConfig,
    tokenizer: Any,
    num_image_tokens: int,
    image_transform: Callable,
) -> MultimodalDataset:
    """`captions`: stage-1 pairs (caption format, no chat); `conversations`: LLaVA JSON or a
    caption JSON whose captions become answers to a sampled instruction (MiniGPT-4 stage 2).

    Instructions are drawn from the module `random` stream, which the training loop seeds and
    checkpoints, so a resumed run draws the same ones."""
    if not cfg.path:
        raise ValueError("data.path is not set: point it at a caption JSON, cc_sbu_align filter_cap.json or LLaVA JSON")
    skips = SkipCounter()
    if cfg.source == "captions":
        records = read_caption_json(cfg.path, cfg.image_root, skips=skips)
        encode = make_caption_encoder(
            tokenizer, num_image_tokens, fmt=cfg.caption_format, clean=cfg.clean_captions, max_length=cfg.max_length
        )
    elif cfg.source == "conversations":
        if _looks_like_llava(cfg.path):
            records = read_llava_json(cfg.path, cfg.image_root, template=cfg.template, skips=skips)
        else:  # a caption JSON (e.g. cc_sbu_align): captions answer a sampled instruction
            records = read_caption_json(cfg.path, cfg.image_root, skips=skips)
        encode = make_conversation_encoder(
            tokenizer, cfg.template, num_image_tokens, max_length=cfg.max_length, rng=None
        )
    else:
        raise ValueError(f"unknown data.source {cfg.source!r}; known: captions, conversations")
    if not records:
        raise ValueError(f"{cfg.path}: no usable records ({skips.summary()})")
    return MultimodalDataset(records, encode, image_transform, skips=skips)
