"""Streamed training data: webdataset shards, map-style sources as streams, and ratio mixes.

Every stream is a torch ``IterableDataset`` that splits itself by rank and by DataLoader
worker, and yields samples exactly as ``MultimodalDataset.__getitem__`` does (None for a bad
one, counted and named in a ``SkipCounter`` that DataLoader workers share).

[Contract] with the training loop:
- ``set_epoch(e)`` before iterating: the shard order, the shuffle buffers and the mixing draws
  are seeded by (seed, epoch, rank, worker), so an epoch is the same in every run.
- ``set_resume(batches_consumed, batch_size)`` (after ``set_epoch``): a DataLoader with that
  batch size, the same ``num_workers``, ``drop_last=False`` and the default ``in_order=True``
  then yields exactly the batches that follow the first ``batches_consumed`` batches of this
  rank in this epoch. Consumed samples are passed over as raw tar members / indices, never
  decoded. It holds until ``set_epoch`` names another epoch.
- Rank and world size: given, else torch.distributed if initialised, else env RANK /
  WORLD_SIZE, else 0 / 1. Do not let accelerate shard or dispatch these loaders again.
- Recreate the DataLoader each epoch (no ``persistent_workers``): workers hold a copy of the
  dataset made when the loader's iterator starts, so a later ``set_epoch`` would not reach them.

How a DataLoader interleaves workers (torch's ``_MultiProcessingDataLoaderIter``): worker w
batches its own stream; the loader hands out batch i from worker i mod W, and once a worker is
exhausted it is passed over. So after K batches each worker has delivered a known number of
batches, and the resumed loader's worker 0 must play the worker that owned batch K: logical
worker ids are rotated by that offset (see ``_consumed_per_worker``).
"""

from __future__ import annotations

import glob
import io
import logging
import math
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

from mmalign.data.sources import (
    CaptionRecord,
    MultimodalDataset,
    SampleProblem,
    SkipCounter,
    encode_sample,
    load_image,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator default


def rank_world() -> tuple[int, int]:
    """This process's (rank, world size): torch.distributed if initialised, else env, else 0/1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _consumed_per_worker(batches: Sequence[int], consumed: int) -> tuple[list[int], int]:
    """Batches each worker had delivered when a DataLoader over workers yielding ``batches[w]``
    batches had yielded ``consumed`` in all, and which worker delivers the next one.

    Round r of the loader visits, in order, every worker that has more than r batches."""
    done, left, r = [0] * len(batches), min(consumed, sum(batches)), 0
    while True:
        live = [w for w, n in enumerate(batches) if n > r]
        if not live:
            return done, 0
        for w in live:
            if left == 0:
                return done, w
            done[w], left = done[w] + 1, left - 1
        r += 1


class StreamDataset(IterableDataset):
    """Epoch, resume and rank/worker bookkeeping shared by every stream.

    A subclass defines ``_count(w, W)`` (how many items logical worker w of W yields this epoch,
    None samples included) and ``_items(w, W, skip)`` (those items, the first ``skip`` passed
    over without decoding)."""

    def __init__(self, *, seed: int = 0, rank: int | None = None, world: int | None = None) -> None:
        super().__init__()
        self.seed = seed
        self.rank, self.world = rank_world() if rank is None or world is None else (rank, world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world})")
        self.epoch = 0
        self.resume: tuple[int, int, int] | None = None  # (epoch, batches consumed, batch size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.resume is not None and self.resume[0] != epoch:
            self.resume = None

    def set_resume(self, batches_consumed: int, batch_size: int) -> None:
        if batches_consumed < 0 or batch_size < 1:
            raise ValueError(f"set_resume({batches_consumed}, {batch_size}): need consumed >= 0, batch size >= 1")
        self.resume = (self.epoch, batches_consumed, batch_size) if batches_consumed else None
        if self.resume is not None:
            self._prepare_resume()

    def _prepare_resume(self) -> None:
        """Hook: precompute, in the main process, what ``_count`` needs (e.g. shard sizes)."""

    def _count(self, worker: int, num_workers: int) -> int:
        raise NotImplementedError

    def _items(self, worker: int, num_workers: int, skip: int) -> Iterator[dict[str, Any] | None]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip, offset = 0, 0
        if self.resume is not None and self.resume[0] == self.epoch:
            _, consumed, bs = self.resume
            counts = [self._count(v, n_workers) for v in range(n_workers)]
            done, offset = _consumed_per_worker([math.ceil(c / bs) for c in counts], consumed)
            logical = (offset + w) % n_workers
            skip = min(done[logical] * bs, counts[logical])
        yield from self._items((offset + w) % n_workers, n_workers, skip)

    @property
    def skipped(self) -> dict[str, Any]:
        return self.skips.summary()


# --------------------------------------------------------------------------------------------
# webdataset shards (img2dataset layout)


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Shard list from a brace pattern (``/data/{00000..00099}.tar``), ``a::b`` lists, a folder
    of ``*.tar`` (img2dataset's output folder), or a list of any of these."""
    if not isinstance(urls, str):
        return [u for x in urls for u in expand_shards(x)]
    if os.path.isdir(urls):
        found = sorted(glob.glob(os.path.join(urls, "*.tar")))
        if not found:
            raise ValueError(f"{urls}: no *.tar shards in this folder")
        return found
    return wds.shardlists.expand_urls(urls)


def looks_like_shards(path: str) -> bool:
    """A shard pattern or list, or a folder holding ``*.tar``, rather than one JSON file."""
    if os.path.isdir(path):
        return bool(glob.glob(os.path.join(path, "*.tar")))
    return any(p.split("?")[0].endswith((".tar", ".tgz", ".tar.gz")) for p in path.split("::"))


def _header_ok(h: bytes) -> bool:
    """A full 512-byte block with the unsigned or the signed checksum ``tarfile`` accepts."""
    if len(h) < 512:
        return False
    try:
        chk = int(h[148:156].split(b"\0", 1)[0].strip() or b"0", 8)  # as tarfile's nti reads it
    except ValueError:
        return False
    unsigned = sum(h[:148]) + 256 + sum(h[156:])
    if chk == unsigned:  # the common case; the signed sum costs a Python loop over the block
        return True
    return chk == unsigned - 2 * sum(b for b in h[:148] + h[156:] if b > 127)


def local_members(path: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of the regular members of a local uncompressed tar whose data is
    all there, read from the 512-byte headers alone (``tarfile`` parses far more and is ~15x
    slower). Ends where ``tarfile`` ends an archive: a zero, short or bad-checksum header; pax
    ``path`` / GNU long names honoured."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        off, long_name = 0, None
        while True:
            f.seek(off)
            h = f.read(512)
            if len(h) < 512 or h == bytes(512) or not _header_ok(h):
                return
            field = h[124:136]
            n = int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.rstrip(b"\0 ") or b"0", 8)
            kind, data_end = h[156:157], off + 512 + n
            if data_end > size:
                return  # the member's data is cut short: it is not part of the shard
            if kind in (b"x", b"L"):  # the next member's long name (pax record / GNU)
                f.seek(off + 512)
                data = f.read(n)
                if kind == b"L":
                    long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                else:
                    m = re.search(rb"\d+ path=([^\n]*)\n", data)
                    long_name = m.group(1).decode("utf-8", "surrogateescape") if m else long_name
            elif kind in (b"0", b"\0", b"7"):
                name = h[:100].split(b"\0", 1)[0]
                if h[257:262] == b"ustar" and h[345:500].strip(b"\0"):
                    name = h[345:500].split(b"\0", 1)[0] + b"/" + name
                yield long_name if long_name is not None else name.decode("utf-8", "surrogateescape"), off + 512, n
                long_name = None
            elif kind != b"g":
                long_name = None
            off = data_end + (-n % 512)


def _streamed_members(url: str) -> Iterator[str]:
    """The same for any URL webdataset opens: read through once (undecoded), as the stream does."""
    stream = wds.gopen(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for m in tar:
                if m.isreg():
                    tar.extractfile(m).read()  # raises on a short member, as the stream does
                    yield m.name
    finally:
        stream.close()


def count_shard_samples(url: str) -> int:
    """Samples webdataset will group from one shard, without decoding anything: from the tar
    headers alone for a local ``.tar``, else by reading the shard through once.

    Mirrors ``webdataset.tarfile_samples``: a member whose data is cut short ends the shard and
    is not part of it, meta names are passed over, consecutive members sharing a key are one
    sample."""
    local = os.path.isfile(url) and url.endswith(".tar")
    n, last = 0, None
    try:
        members = (name for name, _, _ in local_members(url)) if local else _streamed_members(url)
        for name in members:
            if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
                continue
            if _SKIP_META.match(name):
                continue
            prefix, _ = base_plus_ext(name)
            if prefix is not None and prefix != last:
                n, last = n + 1, prefix
    except (tarfile.TarError, OSError, EOFError, ValueError):
        pass
    return n


def _local_tar_problem(url: str) -> tuple[str, str] | None:
    """(reason, detail) when a local ``.tar`` is not a tar at all (its first block is no tar
    header: an HTML error page, a gzip, an empty file) or is cut off (a tar written to the end
    closes with two zero blocks; one cut while written or copied does not). None when it is
    whole, or not a local file (the stream's errors tell then)."""
    if not (os.path.isfile(url) and url.endswith(".tar")):
        return None
    size = os.path.getsize(url)
    with open(url, "rb") as f:
        head = f.read(512)
        f.seek(max(size - 1024, 0))
        tail = f.read(1024)
    if size == 0:
        return "not a tar file", "empty file"
    if head != bytes(len(head)) and not _header_ok(head):
        return "not a tar file", f"{size} bytes starting {head[:32]!r}: no tar header"
    if size < 1024 or size % 512 or tail != bytes(1024):
        return "truncated tar", "no end-of-archive blocks: its last samples are lost"
    return None


_NOT_A_TAR = {"empty file", "invalid header", "bad checksum"}  # tarfile's ReadError at the first header
_CUT_SHORT = {"truncated header", "unexpected end of data"}


def _tar_error_reason(exn: Exception) -> str:
    """What a stream error says about a shard: "not a tar file", "truncated tar" or "unreadable tar"."""
    first = str(exn.args[0]).split(" @ ")[0] if exn.args else ""  # webdataset appends " @ <stream>"
    if isinstance(exn, tarfile.ReadError) and first in _NOT_A_TAR:
        return "not a tar file"
    if isinstance(exn, EOFError) or (isinstance(exn, tarfile.ReadError) and first in _CUT_SHORT):
        return "truncated tar"  # EOFError: a .tar.gz whose gzip stream ends early
    return "unreadable tar"


_BYTES_IO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # how PIL names in-memory images


class ShardStream(StreamDataset):
    """Image-caption pairs from webdataset shards as img2dataset writes them: ``NNNNN.tar``
    holding ``key.jpg`` + ``key.txt`` (+ ``key.json``); the ``NNNNN_stats.json`` / ``.parquet``
    files beside them are not read.

    Shards are shuffled per epoch, dealt to ranks (shard i to rank i mod world), then to
    workers; samples pass through a seeded shuffle buffer. A corrupt image, a missing caption or
    image, an unreadable or truncated shard: counted and named (``shard:key``) in ``skips``, and
    the sample yields None (``collate`` drops it), so batches keep their positions for resume.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        encode_fn: Callable[[Any], dict[str, Any]],
        image_transform: Callable[[Image.Image], Any],
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world: int | None = None,
        skips: SkipCounter | None = None,
        text_key: str = "txt",
    ) -> None:
        super().__init__(seed=seed, rank=rank, world=world)
        self.urls = expand_shards(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        self.encode_fn, self.image_transform = encode_fn, image_transform
        self.shuffle_buffer, self.text_key = shuffle_buffer, text_key
        self.skips = skips if skips is not None else SkipCounter()
        self.shard_sizes: dict[str, int] = {}  # filled by set_resume (main process)
        if len(self.urls) < self.world:
            log.warning("%d shards for %d ranks: some ranks get no data", len(self.urls), self.world)

    def rank_shards(self) -> list[str]:
        shards = [d["url"] for d in wds.SimpleShardList(self.urls, seed=self.seed + self.epoch)]
        return shards[self.rank :: self.world]

    def worker_shards(self, worker: int, num_workers: int) -> list[str]:
        return self.rank_shards()[worker::num_workers]

    def _prepare_resume(self) -> None:
        for url in self.rank_shards():
            if url not in self.shard_sizes:
                self.shard_sizes[url] = count_shard_samples(url)

    def _count(self, worker: int, num_workers: int) -> int:
        shards = self.worker_shards(worker, num_workers)
        for url in shards:
            if url not in self.shard_sizes:
                self.shard_sizes[url] = count_shard_samples(url)
        return sum(self.shard_sizes[u] for u in shards)

    def _items(self, worker: int, num_workers: int, skip: int) -> Iterator[dict[str, Any] | None]:
        shards = self.worker_shards(worker, num_workers)
        if not shards:
            log.warning("rank %d worker %d of %d has no shards this epoch", self.rank, worker, num_workers)
            return
        raw = self.raw_samples(shards)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"shuffle:{self.seed}:{self.epoch}:{self.rank}:{worker}")
            raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw)
        for i, sample in enumerate(raw):
            if i >= skip:
                yield self._decode(sample)

    def raw_samples(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        """The undecoded samples of ``shards`` in order; a shard that is not a tar, cut short or
        unreadable is counted and named once (the samples a cut-off one still holds are used)."""
        reported: set[str] = set()

        def opened(urls: list[str]) -> Iterator[dict[str, str]]:
            for url in urls:
                problem = _local_tar_problem(url)
                if problem is not None:
                    reported.add(url)
                    self.skips.add(problem[0], url, problem[1])
                if problem is None or problem[0] != "not a tar file":  # a cut-off shard's samples are used
                    yield {"url": url}

        def handler(exn: Exception) -> bool:  # webdataset: True = go on with the next member / shard
            text = " ".join(map(str, exn.args))
            url = next((u for u in shards if u in text), "?")
            if url == "?" or url not in reported:  # one error per shard (a cut-off one raises twice)
                reported.add(url)
                self.skips.add(_tar_error_reason(exn), url, repr(exn)[:300])
            return True

        return wds.tarfile_samples(opened(shards), handler=handler)

    def _decode(self, s: dict[str, Any]) -> dict[str, Any] | None:
        where = sample_where(s)
        try:
            caption = read_caption(s, self.text_key)
            image = read_shard_image(s)
        except SampleProblem as problem:
            self.skips.add(problem.reason, where, problem.detail)
            return None
        rec = CaptionRecord(image=image, caption=caption, key=where)
        draws = (self.seed, self.epoch, where)
        return encode_sample(rec, image, self.encode_fn, self.image_transform, self.skips, where, draws=draws)


def sample_where(s: dict[str, Any]) -> str:
    """``shard.tar:key``, how messages name a shard sample."""
    return f"{s.get('__url__', '?')}:{s['__key__']}"


def _members(s: dict[str, Any]) -> list[str]:
    return sorted(k for k in s if k[:2] != "__")


def read_caption(s: dict[str, Any], text_key: str = "txt") -> str:
    """A shard sample's caption; SampleProblem when it is missing, not UTF-8 or empty."""
    text = s.get(text_key)
    if text is None:
        raise SampleProblem("missing caption", f"no .{text_key} in {_members(s)}")
    try:
        caption = text.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SampleProblem("bad caption", repr(e)) from None
    if not caption:
        raise SampleProblem("empty caption")
    return caption


def read_shard_image(s: dict[str, Any]) -> Image.Image:
    """A shard sample's decoded image; SampleProblem when it is missing or corrupt."""
    ext = next((k for k in IMAGE_EXTS if k in s), None)
    if ext is None:
        raise SampleProblem("missing image", f"no .jpg/.png/.webp in {_members(s)}")
    try:
        return load_image(io.BytesIO(s[ext]))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise SampleProblem("corrupt image", _BYTES_IO.sub(f"{sample_where(s)}.{ext}", repr(e))[:300]) from None


# --------------------------------------------------------------------------------------------
# a map-style dataset as a stream (so JSON sources mix with shards)


class IndexStream(StreamDataset):
    """A ``MultimodalDataset`` read in a seeded per-epoch order, split by rank and worker."""

    def __init__(
        self, dataset: MultimodalDataset, *, seed: int = 0, rank: int | None = None, world: int | None = None
    ) -> None:
        super().__init__(seed=seed, rank=rank, world=world)
        self.dataset = dataset
        self.skips = dataset.skips

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)  # the cached view of each record, with a feature cache

    def _order(self, worker: int, num_workers: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()[self.rank :: self.world][worker::num_workers]

    def _count(self, worker: int, num_workers: int) -> int:
        return len(self._order(worker, num_workers))

    def _items(self, worker: int, num_workers: int, skip: int) -> Iterator[dict[str, Any] | None]:
        for i in self._order(worker, num_workers)[skip:]:
            yield self.dataset[i]


# --------------------------------------------------------------------------------------------
# mixing


class MixedStream(StreamDataset):
    """Several streams mixed with sampling ratios (MiniGPT-4 stage 1: LAION : CC+SBU = 115 : 14).

    Each draw picks a source with probability ratio / sum(ratios), then takes one sample from
    it, or ``group`` consecutive samples (``group`` = the per-device batch size gives "each
    batch from one source", as MiniGPT-4 does; worker batches start at multiples of the batch
    size, so they line up with the groups). The epoch ends when a drawn source is exhausted.
    Draws are seeded by (seed, epoch, rank, worker)."""

    def __init__(
        self,
        sources: Sequence[StreamDataset],
        ratios: Sequence[float],
        *,
        group: int = 1,
        seed: int = 0,
        names: Sequence[str] | None = None,
    ) -> None:
        if not sources or len(sources) != len(ratios):
            raise ValueError(f"{len(sources)} sources but {len(ratios)} ratios")
        if any(r <= 0 for r in ratios):
            raise ValueError(f"mixing ratios must be > 0, got {list(ratios)}")
        ranks = {(s.rank, s.world) for s in sources}
        if len(ranks) != 1:
            raise ValueError(f"sources disagree on (rank, world): {ranks}")
        rank, world = ranks.pop()
        super().__init__(seed=seed, rank=rank, world=world)
        self.sources, self.ratios, self.group = list(sources), list(ratios), group
        self.names = list(names) if names is not None else [f"source{i}" for i in range(len(sources))]

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for s in self.sources:
            s.set_epoch(epoch)

    def _prepare_resume(self) -> None:
        for s in self.sources:
            s._prepare_resume()

    def _draws(self, worker: int) -> Iterator[int]:
        """The source of each item, forever (the caller stops at the first exhausted source)."""
        rng = random.Random(f"mix:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        idx = range(len(self.sources))
        while True:
            src = rng.choices(idx, weights=self.ratios)[0]
            for _ in range(self.group):
                yield src

    def _count(self, worker: int, num_workers: int) -> int:
        left = [s._count(worker, num_workers) for s in self.sources]
        n = 0
        for src in self._draws(worker):
            if left[src] == 0:
                return n
            left[src], n = left[src] - 1, n + 1
        raise AssertionError("unreachable")

    def _items(self, worker: int, num_workers: int, skip: int) -> Iterator[dict[str, Any] | None]:
        draws = self._draws(worker)
        passed = [0] * len(self.sources)
        for _ in range(skip):  # replay the draws of consumed items; nothing is read
            passed[next(draws)] += 1
        its = [s._items(worker, num_workers, passed[i]) for i, s in enumerate(self.sources)]
        for src in draws:
            try:
                yield next(its[src])
            except StopIteration:
                return

    @property
    def skipped(self) -> dict[str, Any]:
        counters = {str(s.skips.path): s.skips for s in self.sources}
        return merge_summaries([c.summary() for c in counters.values()])


def merge_summaries(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Add up ``SkipCounter.summary()`` dicts (e.g. one per source or per rank)."""
    out: dict[str, Any] = {"total": 0, "counts": {}, "examples": {}, "truncated": 0, "truncated_examples": []}
    for s in summaries:
        out["total"] += s.get("total", 0)
        out["truncated"] += s.get("truncated", 0)
        out["truncated_examples"].extend(s.get("truncated_examples", []))
        for k, v in s.get("counts", {}).items():
            out["counts"][k] = out["counts"].get(k, 0) + v
        for k, v in s.get("examples", {}).items():
            out["examples"].setdefault(k, []).extend(v)
        if "log" in s:
            out.setdefault("logs", []).append(s["log"])
    return out
