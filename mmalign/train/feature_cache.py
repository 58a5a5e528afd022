"""`mmalign cache-features`: run a stage's frozen part once over its data and keep the outputs.

The stage's config says which model, which freezing policy and which data; the cache holds, per
image, what the projector reads (``mmalign.model.features``), in float16 / bfloat16, as
webdataset shards keyed like the source samples (layout: ``mmalign.data.features``). Stage 1 then
trains from it with ``data.features=DIR`` and never decodes an image or runs the vision tower.

A random train transform (MiniGPT-4's random crops) is cached as ``views`` draws per image, one
drawn per epoch; ``views=1`` with the eval transform is the cheap variant. Refused: a stage whose
policy trains part of what the cache would replace (ShareGPT4V stage 1 tunes half the ViT).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmalign.config import RunConfig, with_recipe_defaults
from mmalign.data.build import check_data, source_kinds, source_records
from mmalign.data.features import (
    DTYPES,
    FEATURES,
    MANIFEST,
    RECORDS_PER_SHARD,
    SKIP,
    FeatureCache,
    encode_features,
    record_key,
    source_identity,
)
from mmalign.data.sources import SampleProblem, SkipCounter, read_record_image
from mmalign.data.stream import ShardStream, count_shard_samples, expand_shards, read_caption, read_shard_image
from mmalign.model import apply_freeze, model_from_config, train_image_transform
from mmalign.model.features import cached_part_trains, feature_fingerprint, frozen_features

log = logging.getLogger(__name__)


@dataclass
class Unit:
    """One cached shard's worth of work: a source shard, or a run of a JSON source's records."""

    source: int
    name: str  # the cached shard's file name
    url: str | None = None  # a source shard
    records: list[tuple[int, Any]] | None = None  # (index, record) of a JSON source


def _units(cfg: RunConfig, skips: SkipCounter) -> tuple[list[Unit], list[dict[str, Any]]]:
    """The work, and the manifest's entry per source (identity, shard names)."""
    units, sources = [], []
    for i, (src, kind) in enumerate(source_kinds(cfg.data)):
        if kind == "webdataset":
            mine = [Unit(i, f"{n:05d}.tar", url=url) for n, url in enumerate(expand_shards(src.path))]
        else:
            records = list(enumerate(source_records(cfg.data, src, kind, skips)))
            mine = [
                Unit(i, f"{n:05d}.tar", records=records[start : start + RECORDS_PER_SHARD])
                for n, start in enumerate(range(0, max(len(records), 1), RECORDS_PER_SHARD))
            ]
        units += mine
        entry = {"path": src.path, "identity": source_identity(src.path, kind), "shards": [u.name for u in mine]}
        sources.append(entry)
    return units, sources


def _images_in(unit: Unit) -> int:
    if unit.records is not None:
        return sum(rec.image is not None for _, rec in unit.records)
    return count_shard_samples(unit.url)


def _captioned_image(s: dict[str, Any]) -> Any:
    """A shard sample's image, when the sample is usable as a whole (the stream's checks, in order)."""
    read_caption(s)
    return read_shard_image(s)


class CacheItems(IterableDataset):
    """Each unit's samples decoded and transformed (``views`` draws each, seeded by the sample),
    in order, then an end marker; DataLoader workers take whole units."""

    def __init__(self, units: list[Unit], transform: Any, views: int, seed: int, skips: SkipCounter) -> None:
        self.units, self.transform, self.views, self.seed, self.skips = units, transform, views, seed, skips

    def _views(self, image: Any, unit: Unit, key: str) -> torch.Tensor:
        """``views`` draws of the transform; a random one draws the same crops in every run."""
        seed = zlib.crc32(f"{self.seed}:{unit.source}:{key}".encode())
        # the CPU generator the transforms draw from; torch.manual_seed would also seed every
        # accelerator backend, recording a stack trace each (~2 ms a call: a third of a toy cache)
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        return torch.stack([torch.as_tensor(self.transform(image)) for _ in range(self.views)])

    def _samples(self, unit: Unit) -> Iterator[dict[str, Any]]:
        if unit.records is not None:
            for index, rec in unit.records:
                if rec.image is not None:
                    yield self._item(unit, record_key(index), lambda rec=rec: read_record_image(rec))
            return
        stream = ShardStream([unit.url], None, None, rank=0, world=1, skips=self.skips)
        for s in stream.raw_samples([unit.url]):
            item = self._item(unit, s["__key__"], lambda s=s: _captioned_image(s))
            yield {**item, "txt": s.get("txt")}

    def _item(self, unit: Unit, key: str, read: Any) -> dict[str, Any]:
        try:
            return {"key": key, "views": self._views(read(), unit, key)}
        except SampleProblem as problem:
            return {"key": key, "skip": {"reason": problem.reason, "detail": problem.detail}}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for u in range(worker, len(self.units), workers):
            for item in self._samples(self.units[u]):
                yield {**item, "unit": u}
            yield {"unit": u, "end": True}


class ShardWriter:
    """Items -> cached shards, in arrival order; the frozen part runs on ``batch_size`` images at a time."""

    def __init__(self, model: Any, out: Path, units: list[Unit], dtype: torch.dtype, batch_size: int, autocast: str):
        self.model, self.out, self.units, self.dtype, self.batch_size = model, out, units, dtype, batch_size
        self.autocast = autocast
        self.queue: list[dict[str, Any]] = []
        self.writers: dict[int, wds.TarWriter] = {}
        self.written = {"images": 0, "skipped": 0}
        self.checked_views = False

    def add(self, item: dict[str, Any]) -> None:
        self.queue.append(item)
        if sum(len(i["views"]) for i in self.queue if "views" in i) >= self.batch_size:
            self.flush()

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.autocast)
        autocast = torch.autocast(device.type, dtype=half) if half else contextlib.nullcontext()
        parts = []
        with torch.no_grad(), autocast:
            for chunk in pixels.split(self.batch_size):
                dtype = next(self.model.parameters()).dtype
                parts.append(frozen_features(self.model, chunk.to(device, dtype)).to("cpu", self.dtype))
        return torch.cat(parts)

    def _check_views(self, views: torch.Tensor) -> None:
        """K equal draws would store K copies of one view: the transform is not random."""
        if not self.checked_views and len(views) > 1 and all(torch.equal(views[0], v) for v in views[1:]):
            raise ValueError(
                f"--views {len(views)}: the stage's image transform gave {len(views)} identical views (it is not "
                "random); cache --views 1, or use a random train transform"
            )
        self.checked_views = True

    def flush(self) -> None:
        with_views = [i for i in self.queue if "views" in i]
        if with_views:
            self._check_views(with_views[0]["views"])
            features = self._forward(torch.cat([i["views"] for i in with_views]))
            for item, part in zip(with_views, features.split([len(i["views"]) for i in with_views])):
                item["features"] = part
        for item in self.queue:
            self._write(item)
        self.queue = []

    def _write(self, item: dict[str, Any]) -> None:
        u = item["unit"]
        if u not in self.writers:
            folder = self.out / f"source-{self.units[u].source}"
            folder.mkdir(parents=True, exist_ok=True)
            self.writers[u] = wds.TarWriter(str(folder / self.units[u].name))
        if item.get("end"):
            self.writers.pop(u).close()
            return
        sample: dict[str, Any] = {"__key__": item["key"]}
        if item.get("txt") is not None:
            sample["txt"] = item["txt"]
        if "skip" in item:
            sample[SKIP] = json.dumps(item["skip"]).encode()
            self.written["skipped"] += 1
        else:
            sample[FEATURES] = encode_features(item["features"])
            self.written["images"] += 1
        self.writers[u].write(sample)


def refuse_trained_cached_part(model: Any, policy: str) -> None:
    """A cache of a part that trains would be stale after the first step."""
    apply_freeze(model, policy)
    trains = cached_part_trains(model)
    if trains:
        raise ValueError(
            f"train.trainable={policy} trains {trains[0]} (and {len(trains) - 1} more) of the frozen part a feature "
            "cache replaces (its outputs change every step): train from images (data.features=null)"
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _storage_line(model: Any, units: list[Unit], views: int, dtype: str) -> tuple[str, list[int]]:
    """What the cache will take, from one feature's shape and the image count (tar headers)."""
    size = model.config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    param = next(model.parameters())
    with torch.no_grad():
        shape = list(
            frozen_features(model, torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))[0].shape
        )
    per_view = shape[0] * shape[1] * DTYPES[dtype].itemsize
    images = sum(_images_in(u) for u in units)
    line = (
        f"feature cache: {images:,} images x {views} view(s) x {shape[0]} x {shape[1]} {dtype} = "
        f"{_size(per_view * views)} per image, {_size(per_view * views * images)} in all"
    )
    return line, shape


def cache_features(
    cfg: RunConfig,
    out: str | Path,
    *,
    views: int = 1,
    dtype: str = "float16",
    batch_size: int = 64,
    num_workers: int | None = None,
) -> FeatureCache:
    """Write the cache of ``cfg``'s stage to ``out`` (a new folder); ``cache.json`` comes last, so
    a cache cut short is never mistaken for a whole one."""
    if views < 1 or dtype not in DTYPES:
        raise ValueError(f"--views must be >= 1 and --dtype one of {sorted(DTYPES)}; got {views}, {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty; remove it or pick another folder")
    cfg = with_recipe_defaults(cfg)
    check_data(cfg.data)
    model, _ = model_from_config(cfg.model)
    refuse_trained_cached_part(model, cfg.train.trainable)
    model.eval()  # the frozen part runs as in training: eval mode, no dropout
    transform = train_image_transform(model, cfg)  # the stage's (StageRun.build_dataset)
    skips = SkipCounter()
    units, sources = _units(cfg, skips)
    line, shape = _storage_line(model, units, views, dtype)
    print(line, flush=True)
    writer = ShardWriter(model, out, units, DTYPES[dtype], batch_size, cfg.train.mixed_precision)
    items = CacheItems(units, transform, views, cfg.train.seed, skips)
    workers = cfg.data.num_workers if num_workers is None else num_workers
    try:
        for item in DataLoader(items, batch_size=None, num_workers=workers):
            writer.add(item)
        writer.flush()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    manifest = {
        "fingerprint": feature_fingerprint(model, transform, cfg.train.mixed_precision),
        "views": views,
        "dtype": dtype,
        "shape": shape,
        "sources": sources,
        "written": writer.written,
        "skipped": skips.summary(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    log.info("feature cache %s: %s", out, writer.written)
    return FeatureCache.open(out)


__all__ = ["cache_features", "refuse_trained_cached_part"]
