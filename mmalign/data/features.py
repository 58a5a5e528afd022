"""A frozen-feature cache: what a stage's frozen part computes for each of its images, computed
once (``mmalign cache-features``) and read in place of the images (``data.features=DIR``).

Layout of DIR::

    cache.json               what produced it (fingerprint), views, dtype, feature shape, the sources
    source-0/00000.tar ...   one folder per source of data.path / data.sources, in order
      shard sources:  one cached shard per source shard (same order), the same keys; per sample
                      key.txt (the caption) and key.safetensors ({"features": [views, tokens, width]})
      JSON sources:   key = the record's index (9 digits), 10,000 records per shard; key.safetensors
      either:         key.skip ({"reason", "detail"}) instead of features: the sample was unusable

Shards keep everything the stream does with them unchanged (shuffled per epoch, dealt to ranks
and workers, a shuffle buffer, resume by counting tar headers); a JSON source keeps its map-style
dataset (and its sampler), reading record i's features with one seek into its shard. Each epoch
draws one of the cached views per sample, seeded by (seed, epoch, key), so a resumed run draws
the same ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mmalign.data.sources import CaptionRecord, DataError, SampleProblem, encode_sample
from mmalign.data.stream import ShardStream, expand_shards, local_members, read_caption, sample_where

MANIFEST = "cache.json"
FEATURES = "safetensors"  # the member holding a sample's features
SKIP = "skip"  # the member saying why a sample was unusable when cached
RECORDS_PER_SHARD = 10_000
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def encode_features(features: torch.Tensor) -> bytes:
    return save_safetensors({"features": features.contiguous()})


def decode_features(blob: bytes) -> torch.Tensor:
    return load_safetensors(blob)["features"]


def record_key(index: int) -> str:
    return f"{index:09d}"


def view_index(seed: int, epoch: int, key: str, views: int) -> int:
    """Which cached view a sample gets in ``epoch`` (seeded, so a resumed run draws the same)."""
    return 0 if views == 1 else random.Random(f"view:{seed}:{epoch}:{key}").randrange(views)


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_identity(path: str, kind: str) -> dict[str, Any]:
    """What a cached source must match: a JSON file's bytes, or the shard names and sizes in order
    (paths may move; the data may not change)."""
    if kind != "webdataset":
        return {"type": "json", "sha256": _sha256(path), "bytes": os.path.getsize(path)}
    urls = expand_shards(path)
    return {
        "type": "webdataset",
        "shards": [os.path.basename(u) for u in urls],
        "bytes": [os.path.getsize(u) if os.path.isfile(u) else None for u in urls],
    }


@dataclass
class FeatureCache:
    """A cache folder's manifest (``cache.json``), checked against the run that wants to use it."""

    folder: Path
    fingerprint: dict[str, Any]
    views: int
    dtype: str
    shape: list[int]  # [tokens, width] of one view
    sources: list[dict[str, Any]]  # per source: {"path", "identity", "shards", "samples"}

    @classmethod
    def open(cls, folder: str | Path) -> FeatureCache:
        folder = Path(folder)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            raise DataError(
                f"data.features={folder}: no {MANIFEST}; write the cache first: "
                f"mmalign cache-features CONFIG --out {folder}"
            )
        try:
            data = json.loads(manifest.read_text())
            return cls(folder, data["fingerprint"], data["views"], data["dtype"], data["shape"], data["sources"])
        except (ValueError, KeyError) as e:
            raise DataError(f"{manifest}: not a feature-cache manifest ({e!r})") from None

    def check_sources(self, identities: list[dict[str, Any]], paths: list[str]) -> None:
        """The run's sources (``source_identity`` each, in order) are the cached ones."""
        if len(identities) != len(self.sources):
            raise DataError(
                f"data.features={self.folder} caches {len(self.sources)} source(s), this run reads {len(identities)}"
            )
        for i, (mine, cached, path) in enumerate(zip(identities, self.sources, paths)):
            if mine != cached["identity"]:
                raise DataError(
                    f"data.features={self.folder}: source {i} ({path}) is not the data it cached "
                    f"({cached['path']}): {_first_difference(cached['identity'], mine)}; "
                    "run mmalign cache-features again"
                )

    def check_fingerprint(self, expected: dict[str, Any]) -> None:
        """Refuse a cache written by another frozen part, transform, feature selection or dtype."""
        from mmalign.model.features import fingerprint_differences

        differences = fingerprint_differences(self.fingerprint, expected)
        if differences:
            raise ValueError(
                f"data.features={self.folder} was written for another setup than this run:\n  "
                + "\n  ".join(differences)
                + "\nrun mmalign cache-features with this stage's config again (or drop data.features)"
            )

    def shards(self, source: int) -> list[str]:
        return [str(self.folder / f"source-{source}" / name) for name in self.sources[source]["shards"]]


def _first_difference(cached: dict[str, Any], mine: dict[str, Any]) -> str:
    key = next(k for k in sorted(set(cached) | set(mine)) if cached.get(k) != mine.get(k))
    return f"{key} differs"


class FeatureLookup:
    """Record i's cached features, for a map-style dataset: an index of (shard, offset, size) per
    key read from the shards' tar headers, then one ``pread`` per sample. Safe in DataLoader
    workers (each process opens its own file handles)."""

    def __init__(self, shards: list[str], seed: int, views: int) -> None:
        self.shards, self.seed, self.views = shards, seed, views
        self.index: dict[str, tuple[int, int, int, str]] = {}  # key -> (shard, offset, size, member)
        for s, shard in enumerate(shards):
            for name, offset, size in local_members(shard):
                key, _, ext = os.path.basename(name).partition(".")
                if ext in (FEATURES, SKIP):
                    self.index[key] = (s, offset, size, ext)
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a forked worker: its own descriptors
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return os.pread(self._files[shard], size, offset)

    def get(self, index: int, epoch: int) -> torch.Tensor:
        """``[tokens, width]``: this epoch's view of record ``index``; SampleProblem if it was unusable."""
        key = record_key(index)
        if key not in self.index:
            raise SampleProblem("not in the feature cache", key)
        shard, offset, size, ext = self.index[key]
        blob = self._read(shard, offset, size)
        if ext == SKIP:
            skipped = json.loads(blob)
            raise SampleProblem(skipped["reason"], skipped.get("detail", ""))
        return decode_features(blob)[view_index(self.seed, epoch, key, self.views)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}


class FeatureShardStream(ShardStream):
    """A ``ShardStream`` over cached shards: the same order, split and resume, each sample's
    caption and this epoch's view of its features instead of its image."""

    def __init__(self, urls: list[str], *args: Any, views: int = 1, **kwargs: Any) -> None:
        super().__init__(urls, *args, **kwargs)
        self.views = views

    def _decode(self, s: dict[str, Any]) -> dict[str, Any] | None:
        where = sample_where(s)
        try:
            if SKIP in s:
                skipped = json.loads(s[SKIP])
                raise SampleProblem(skipped["reason"], skipped.get("detail", ""))
            caption = read_caption(s, self.text_key)
            if FEATURES not in s:
                raise SampleProblem("not in the feature cache", where)
        except SampleProblem as problem:
            self.skips.add(problem.reason, where, problem.detail)
            return None
        features = decode_features(s[FEATURES])[view_index(self.seed, self.epoch, s["__key__"], self.views)]
        rec = CaptionRecord(image=None, caption=caption, key=where)
        draws = (self.seed, self.epoch, where)
        return encode_sample(rec, features, self.encode_fn, None, self.skips, where, "image_features", draws)


__all__ = [
    "DTYPES",
    "MANIFEST",
    "FeatureCache",
    "FeatureLookup",
    "FeatureShardStream",
    "decode_features",
    "encode_features",
    "record_key",
    "source_identity",
    "view_index",
]
