"""Assemble a training dataset from a `DataConfig`: read the records or open the shards, pick
the encoder, mix sources by ratio. ``check_data`` reads and checks the same, with no tokenizer
or model, so unusable data stops a run before the model loads.

What comes back: a map-style ``MultimodalDataset`` for one JSON source (as before), a
``ShardStream`` for webdataset shards, a ``MixedStream`` for ``data.sources``. Streams are
IterableDatasets with ``set_epoch`` / ``set_resume`` (see ``mmalign.data.stream``)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmalign.config import DataConfig, SourceConfig, with_fallbacks
from mmalign.data.features import FeatureCache, FeatureLookup, FeatureShardStream, source_identity
from mmalign.data.sampling import LengthGroupedSampler
from mmalign.data.sources import (
    CaptionRecord,
    ConversationRecord,
    DataError,
    MultimodalDataset,
    Record,
    SkipCounter,
    make_caption_encoder,
    make_conversation_encoder,
    read_caption_json,
    read_llava_json,
)
from mmalign.data.stream import (
    IndexStream,
    MixedStream,
    ShardStream,
    StreamDataset,
    expand_shards,
    looks_like_shards,
)

SOURCE_TYPES = ("webdataset", "captions", "llava")
log = logging.getLogger(__name__)


def _looks_like_llava(path: str) -> bool:
    """LLaVA JSON is a list of records with "conversations"; peek instead of parsing twice."""
    with open(path, encoding="utf-8", errors="replace") as f:  # bad bytes are load_json's to report
        head = f.read(1 << 16)
    return head.lstrip().startswith("[") and '"conversations"' in head


def _source_type(path: str, declared: str | None) -> str:
    if declared is not None:
        if declared not in SOURCE_TYPES:
            raise DataError(f"unknown source type {declared!r} for {path}; known: {', '.join(SOURCE_TYPES)}")
        return declared
    if looks_like_shards(path):
        return "webdataset"
    if Path(path).is_dir():
        raise DataError(f"{path}: a folder without *.tar shards (expected shards or a JSON file)")
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file (expected shards, a caption / cc_sbu_align JSON or a LLaVA JSON)")
    return "llava" if _looks_like_llava(path) else "captions"


def _sources(cfg: DataConfig) -> list[SourceConfig]:
    """The sources ``cfg`` names (``data.path`` as one source), each with a path."""
    if cfg.sources and cfg.path:
        raise DataError(
            "set data.path or data.sources, not both (on the command line data.sources=none clears the list)"
        )
    if cfg.sources:
        if cfg.mix not in ("sample", "batch"):
            raise DataError(f"unknown data.mix {cfg.mix!r}; known: sample, batch")
        for i, s in enumerate(cfg.sources):
            if not s.path:
                raise DataError(f"data.sources[{i}].path is not set")
        return list(cfg.sources)
    if not cfg.path:
        raise DataError(
            "data.path is not set: point it at webdataset shards, a caption JSON, cc_sbu_align filter_cap.json or "
            "LLaVA JSON (or list data.sources)"
        )
    return [SourceConfig(path=cfg.path, image_root=cfg.image_root)]


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
    raise DataError(f"unknown data.source {cfg.source!r}; known: captions, conversations")


def _answers_as_captions(records: list[ConversationRecord], skips: SkipCounter) -> list[CaptionRecord]:
    out = []
    for r in records:
        if r.image is None:
            skips.add("text-only record in caption data", r.key)
            continue
        out.append(CaptionRecord(image=r.image, caption=r.turns[-1]["content"], key=r.key))
    return out


def _read_records(cfg: DataConfig, src: SourceConfig, kind: str, skips: SkipCounter) -> list[Record]:
    """The records of one JSON source, read as training reads them (``check_data`` reads the same)."""
    if kind == "llava":
        records = read_llava_json(src.path, src.image_root, template=cfg.template, skips=skips)
        if cfg.source == "captions":  # pretraining JSON in LLaVA form (ShareGPT4V-PT): the answer is the caption
            records = _answers_as_captions(records, skips)
    else:  # a caption list or cc_sbu_align: captions, or answers to a sampled instruction
        records = read_caption_json(src.path, src.image_root, skips=skips)
    if not records:
        raise DataError(f"{src.path}: no usable records ({skips.summary()['counts']})")
    return records


# What the last ``check_data`` read, each taken once by the ``dataset_from_config`` that follows
# it for the same, unchanged file: a large JSON is read once per run, not twice (100k LLaVA
# conversations, 179 MB, take 10 s on a loaded 2-core machine; LLaVA's mix has 665k). Only a
# cache: without an entry the file is read again, the same way.
_CHECKED: dict[tuple, tuple[list[Record], list[dict[str, str]]]] = {}


def _read_key(cfg: DataConfig, src: SourceConfig, kind: str) -> tuple:
    stat = os.stat(src.path)
    return (src.path, src.image_root, kind, cfg.source, cfg.template, stat.st_mtime_ns, stat.st_size)


def _records_for_training(cfg: DataConfig, src: SourceConfig, kind: str, skips: SkipCounter) -> list[Record]:
    """``check_data``'s records when it read this very file, its skips named now; else a fresh read."""
    checked = _CHECKED.pop(_read_key(cfg, src, kind), None)
    if checked is None:
        return _read_records(cfg, src, kind, skips)
    records, events = checked
    for e in events:
        skips.add(e["reason"], e["where"], e.get("detail", ""))
    return records


def _is_remote(url: str) -> bool:
    """A URL webdataset opens itself (``pipe:``, ``http://``, ``s3://``...): not checked here."""
    return re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+:", url) is not None


def _check_shards(path: str) -> None:
    """The pattern expands and some of its local shards exist; missing ones are warned about
    here and counted as unreadable by the stream (one lost shard does not stop a run)."""
    try:
        urls = expand_shards(path)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if not urls or len(missing) == len(urls):
        raise DataError(f"{path}: none of its {len(urls)} shard(s) exists" + (f" ({missing[0]}, ...)" if urls else ""))
    if missing:
        log.warning("%s: %d of %d shards do not exist, e.g. %s", path, len(missing), len(urls), missing[0])


def check_data(cfg: DataConfig) -> None:
    """Read and check what ``cfg`` names, with no tokenizer or model: the training entry calls
    it before the model loads (minutes for 7B), so a broken file stops the run at once.

    Every JSON source is parsed and read into records as training will read them; every shard
    pattern is expanded and its local files looked for. Raises ``DataError`` naming the file
    (and line and column for bad JSON) or the config field. Bad single records are only counted
    here; the ``dataset_from_config`` that follows names and skips them, and takes the records
    read here instead of reading an unchanged file again."""
    cfg = with_fallbacks(cfg)
    if cfg.source not in ("captions", "conversations"):
        raise DataError(f"unknown data.source {cfg.source!r}; known: captions, conversations")
    check_packing(cfg)
    _CHECKED.clear()
    if cfg.features:
        open_feature_cache(cfg)
    for src in _sources(cfg):
        kind = _source_type(src.path, src.type)
        if kind == "webdataset":
            _check_shards(src.path)
            continue
        skips = SkipCounter(quiet=True)
        records = _read_records(cfg, src, kind, skips)
        _CHECKED[_read_key(cfg, src, kind)] = (records, skips.events())
        summary = skips.summary()
        bad = f", {summary['total']} to be skipped {summary['counts']}" if summary["total"] else ""
        log.info("checked %s: %d records%s", src.path, len(records), bad)


def check_packing(cfg: DataConfig) -> None:
    """``data.packing`` rows must hold the longest sample ``data.max_length`` allows."""
    if cfg.packing and cfg.pack_tokens is not None and cfg.pack_tokens < cfg.max_length:
        raise DataError(
            f"data.pack_tokens={cfg.pack_tokens} is below data.max_length={cfg.max_length}: a sample of "
            "max_length tokens would not fit a row (samples are packed whole)"
        )


def pack_tokens_of(cfg: DataConfig) -> int | None:
    """The row budget of packed batches (``data.pack_tokens``, else ``data.max_length``); None without packing."""
    if not cfg.packing:
        return None
    return cfg.pack_tokens if cfg.pack_tokens is not None else cfg.max_length


def source_kinds(cfg: DataConfig) -> list[tuple[SourceConfig, str]]:
    """Each source of ``cfg`` with its type (webdataset, captions, llava)."""
    return [(src, _source_type(src.path, src.type)) for src in _sources(cfg)]


def source_records(cfg: DataConfig, src: SourceConfig, kind: str, skips: SkipCounter) -> list[Record]:
    """The records of one JSON source, as training indexes them (what a feature cache keys by)."""
    return _read_records(with_fallbacks(cfg), src, kind, skips)


def open_feature_cache(cfg: DataConfig) -> FeatureCache:
    """``data.features``, checked against this config's sources (the fingerprint needs the model:
    ``FeatureCache.check_fingerprint``)."""
    cache = FeatureCache.open(cfg.features)
    pairs = source_kinds(cfg)
    cache.check_sources([source_identity(src.path, kind) for src, kind in pairs], [src.path for src, _ in pairs])
    return cache


def _open_source(
    cfg: DataConfig,
    index: int,
    encode: Callable,
    image_transform: Callable,
    skips: SkipCounter,
    *,
    seed: int,
    rank: int | None,
    world: int | None,
    as_stream: bool,
    features: FeatureCache | None,
) -> MultimodalDataset | StreamDataset:
    """Source ``index`` of ``cfg``: its images, or its cached features when ``features`` is given."""
    src = _sources(cfg)[index]
    kind = _source_type(src.path, src.type)
    if kind == "webdataset":
        stream, urls, extra = ShardStream, src.path, {}
        if features is not None:
            stream, urls, extra = FeatureShardStream, features.shards(index), {"views": features.views}
        opts = dict(seed=seed, shuffle_buffer=cfg.shuffle_buffer, rank=rank, world=world, skips=skips)
        return stream(urls, encode, image_transform, **opts, **extra)
    lookup = None if features is None else FeatureLookup(features.shards(index), seed, features.views)
    records = _records_for_training(cfg, src, kind, skips)
    dataset = MultimodalDataset(records, encode, image_transform, skips=skips, features=lookup, seed=seed)
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
    fingerprint: dict[str, Any] | None = None,
) -> MultimodalDataset | StreamDataset:
    """The dataset ``cfg`` describes. ``seed`` seeds shard order, shuffle buffers and mixing
    draws (per epoch); ``batch_size`` (per device) is needed for ``data.mix: batch``; ``rank`` /
    ``world`` default to torch.distributed / env; ``skip_log`` keeps the JSONL of every skipped
    sample (default: a temporary file, read by ``.skipped``). Unusable data raises ``DataError``
    (``check_data`` finds the same before a model is loaded). With ``data.features`` the cached
    features replace the images; ``fingerprint`` (``mmalign.model.features.feature_fingerprint``
    of this run's model and transform) must match the cache's."""
    cfg = with_fallbacks(cfg)
    sources = _sources(cfg)
    encode = _encoder(cfg, tokenizer, num_image_tokens)
    skips = SkipCounter(path=skip_log)
    features = None
    if cfg.features:
        if fingerprint is None:
            raise ValueError("data.features is set: pass the fingerprint of this run's frozen part to check the cache")
        features = open_feature_cache(cfg)
        features.check_fingerprint(fingerprint)
    opts = dict(seed=seed, rank=rank, world=world, features=features)
    if not cfg.sources:
        return _open_source(cfg, 0, encode, image_transform, skips, as_stream=False, **opts)  # type: ignore[arg-type]
    if cfg.mix == "batch" and not batch_size:
        raise ValueError("data.mix: batch needs the per-device batch size (dataset_from_config(batch_size=...))")
    parts = [
        _open_source(cfg, i, encode, image_transform, skips, as_stream=True, **opts)  # type: ignore[arg-type]
        for i in range(len(sources))
    ]
    return MixedStream(
        parts,
        [s.ratio for s in sources],
        group=batch_size if cfg.mix == "batch" else 1,
        seed=seed,
        names=[s.path for s in sources],
    )


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
