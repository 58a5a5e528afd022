"""Assemble a training dataset from a `DataConfig`: read the records or open the shards, pick
the encoder, mix sources by ratio.

What comes back: a map-style ``MultimodalDataset`` for one JSON source (as before), a
``ShardStream`` for webdataset shards, a ``MixedStream`` for ``data.sources``. Streams are
IterableDatasets with ``set_epoch`` / ``set_resume`` (see ``mmalign.data.stream``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmalign.config import DataConfig, SourceConfig, with_fallbacks
from mmalign.data.sampling import LengthGroupedSampler
from mmalign.data.sources import (
    CaptionRecord,
    ConversationRecord,
    MultimodalDataset,
    SkipCounter,
    make_caption_encoder,
    make_conversation_encoder,
    read_caption_json,
    read_llava_json,
)
from mmalign.data.stream import IndexStream, MixedStream, ShardStream, StreamDataset, looks_like_shards

SOURCE_TYPES = ("webdataset", "captions", "llava")


def _looks_like_llava(path: str) -> bool:
    """LLaVA JSON is a list of records with "conversations"; peek instead of parsing twice."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16)
    return head.lstrip().startswith("[") and '"conversations"' in head


def _source_type(path: str, declared: str | None) -> str:
    if declared is not None:
        if declared not in SOURCE_TYPES:
            raise ValueError(f"unknown source type {declared!r} for {path}; known: {', '.join(SOURCE_TYPES)}")
        return declared
    if looks_like_shards(path):
        return "webdataset"
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file (expected shards, a caption / cc_sbu_align JSON or a LLaVA JSON)")
    return "llava" if _looks_like_llava(path) else "captions"


def _encoder(cfg: DataConfig, tokenizer: Any, num_image_tokens: int) -> Callable[[Any], dict[str, Any]]:
    """`captions`: stage-1 pairs (caption format, no chat); `conversations`: chat turns, where a
    caption record becomes the answer to a sampled instruction (MiniGPT-4 stage 2).

    Instructions are drawn from the module `random` stream, which the training loop seeds and
    checkpoints, so a resumed run draws the same ones."""
    if cfg.source == "captions":
        return make_caption_encoder(
            tokenizer, num_image_tokens, fmt=cfg.caption_format, clean=cfg.clean_captions, max_length=cfg.max_length
        )
    if cfg.source == "conversations":
        return make_conversation_encoder(tokenizer, cfg.template, num_image_tokens, max_length=cfg.max_length, rng=None)
    raise ValueError(f"unknown data.source {cfg.source!r}; known: captions, conversations")


def _answers_as_captions(records: list[ConversationRecord], skips: SkipCounter) -> list[CaptionRecord]:
    out = []
    for r in records:
        if r.image is None:
            skips.add("text-only record in caption data", r.key)
            continue
        out.append(CaptionRecord(image=r.image, caption=r.turns[-1]["content"], key=r.key))
    return out


def _open_source(
    cfg: DataConfig,
    src: SourceConfig,
    encode: Callable,
    image_transform: Callable,
    skips: SkipCounter,
    *,
    seed: int,
    rank: int | None,
    world: int | None,
    as_stream: bool,
) -> MultimodalDataset | StreamDataset:
    kind = _source_type(src.path, src.type)
    if kind == "webdataset":
        return ShardStream(
            src.path,
            encode,
            image_transform,
            seed=seed,
            shuffle_buffer=cfg.shuffle_buffer,
            rank=rank,
            world=world,
            skips=skips,
        )
    if kind == "llava":
        records = read_llava_json(src.path, src.image_root, template=cfg.template, skips=skips)
        if cfg.source == "captions":  # pretraining JSON in LLaVA form (ShareGPT4V-PT): the answer is the caption
            records = _answers_as_captions(records, skips)
    else:  # a caption list or cc_sbu_align: captions, or answers to a sampled instruction
        records = read_caption_json(src.path, src.image_root, skips=skips)
    if not records:
        raise ValueError(f"{src.path}: no usable records ({skips.summary()})")
    dataset = MultimodalDataset(records, encode, image_transform, skips=skips)
    return IndexStream(dataset, seed=seed, rank=rank, world=world) if as_stream else dataset


def dataset_from_config(
    cfg: DataConfig,
    tokenizer: Any,
    num_image_tokens: int,
    image_transform: Callable,
    *,
    seed: int = 0,
    batch_size: int | None = None,
    rank: int | None = None,
    world: int | None = None,
    skip_log: str | Path | None = None,
) -> MultimodalDataset | StreamDataset:
    """The dataset ``cfg`` describes. ``seed`` seeds shard order, shuffle buffers and mixing
    draws (per epoch); ``batch_size`` (per device) is needed for ``data.mix: batch``; ``rank`` /
    ``world`` default to torch.distributed / env; ``skip_log`` keeps the JSONL of every skipped
    sample (default: a temporary file, read by ``.skipped``)."""
    cfg = with_fallbacks(cfg)
    encode = _encoder(cfg, tokenizer, num_image_tokens)
    skips = SkipCounter(path=skip_log)
    opts = dict(seed=seed, rank=rank, world=world)
    if cfg.sources and cfg.path:
        raise ValueError(
            "set data.path or data.sources, not both (on the command line data.sources=none clears the list)"
        )
    if cfg.sources:
        if cfg.mix not in ("sample", "batch"):
            raise ValueError(f"unknown data.mix {cfg.mix!r}; known: sample, batch")
        if cfg.mix == "batch" and not batch_size:
            raise ValueError("data.mix: batch needs the per-device batch size (dataset_from_config(batch_size=...))")
        for i, s in enumerate(cfg.sources):
            if not s.path:
                raise ValueError(f"data.sources[{i}].path is not set")
        parts = [
            _open_source(cfg, s, encode, image_transform, skips, as_stream=True, **opts)  # type: ignore[arg-type]
            for s in cfg.sources
        ]
        return MixedStream(
            parts,
            [s.ratio for s in cfg.sources],
            group=batch_size if cfg.mix == "batch" else 1,
            seed=seed,
            names=[s.path for s in cfg.sources],
        )
    if not cfg.path:
        raise ValueError(
            "data.path is not set: point it at webdataset shards, a caption JSON, cc_sbu_align filter_cap.json or "
            "LLaVA JSON (or list data.sources)"
        )
    src = SourceConfig(path=cfg.path, image_root=cfg.image_root)
    return _open_source(cfg, src, encode, image_transform, skips, as_stream=False, **opts)  # type: ignore[arg-type]


def sampler_from_config(
    cfg: DataConfig, dataset: Any, batch_size: int, *, world_size: int = 1, seed: int = 0
) -> LengthGroupedSampler | None:
    """The length-grouped sampler when ``data.group_by_length`` is set (map-style data only),
    else None (the loop keeps its own shuffle)."""
    if not cfg.group_by_length:
        return None
    if not isinstance(dataset, MultimodalDataset):
        raise ValueError("data.group_by_length needs a map-style source (one JSON file), not a stream")
    return LengthGroupedSampler(dataset.lengths, batch_size, world_size=world_size, seed=seed)
