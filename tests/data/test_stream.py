"""Streams: img2dataset-layout shards over ranks x DataLoader workers, bad samples counted and
named, exact resume, ratio mixing."""

import gzip
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from mmalign.data import (
    CaptionRecord,
    IndexStream,
    MixedStream,
    MultimodalDataset,
    ShardStream,
    SkipCounter,
    StreamDataset,
    collate,
    count_shard_samples,
    make_caption_encoder,
    merge_summaries,
)
from mmalign.prompts import IGNORE_INDEX

N = 4  # image tokens
SHARDS, PER_SHARD = 6, 8
CORRUPT = {"000010002", "000030005", "000040000"}  # half-written JPEGs
NO_TXT = "000020006"  # caption file missing
TRUNCATED = 5  # shard 00005.tar cut inside the image of its sample 5


def jpeg(i: int, corrupt: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 37 % 256, 80, 160)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2] if corrupt else data


def to_tensor(im: Image.Image) -> torch.Tensor:
    im = im.resize((4, 4))
    return torch.tensor(list(im.get_flattened_data()), dtype=torch.float32).T.reshape(3, 4, 4) / 255


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """img2dataset's output folder: NNNNN.tar (key.jpg, key.txt, key.json) + NNNNN_stats.json +
    NNNNN.parquet, written with webdataset's TarWriter as img2dataset does. Returns (folder, the
    keys that must come out good)."""
    root = tmp_path_factory.mktemp("laion")
    good = set()
    for s in range(SHARDS):
        path = root / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for j in range(PER_SHARD):
                key = f"{s:05d}{j:04d}"
                sample = {
                    "__key__": key,
                    "jpg": jpeg(j, corrupt=key in CORRUPT),
                    "json": {"key": key, "status": "success"},
                }
                if key != NO_TXT:
                    sample["txt"] = f"a photo {key}"
                sink.write(sample)
                if key not in CORRUPT and key != NO_TXT:
                    good.add(key)
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": PER_SHARD, "successes": PER_SHARD}))
        (root / f"{s:05d}.parquet").write_bytes(b"PAR1 not read by the stream PAR1")
    path = root / f"{TRUNCATED:05d}.tar"
    with tarfile.open(path) as t:  # cut in the middle of sample 5's image: samples 5..7 are lost
        m = next(m for m in t.getmembers() if m.name == f"{TRUNCATED:05d}0005.jpg")
    path.write_bytes(path.read_bytes()[: m.offset_data + m.size // 2])
    good -= {f"{TRUNCATED:05d}{j:04d}" for j in range(5, PER_SHARD)}
    return root, good


def key_of(sample, tokenizer) -> str:
    """The shard key, read back from the learned caption tokens."""
    learned = [t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab != IGNORE_INDEX]
    return tokenizer.decode(learned).split()[-1]


def as_keys(batch, tokenizer):
    return [None if s is None else key_of(s, tokenizer) for s in batch]


def stream(root, tokenizer, rank=0, world=1, **kw) -> ShardStream:
    enc = make_caption_encoder(tokenizer, N, fmt="plain", clean=False)
    return ShardStream(str(root / "{00000..00005}.tar"), enc, to_tensor, rank=rank, world=world, seed=3, **kw)


def batches(ds, tokenizer, batch_size=3, num_workers=2):
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    return [as_keys(b, tokenizer) for b in loader]


def test_two_ranks_two_workers_see_every_good_sample_once(shards, tiny_tokenizer):
    root, good = shards
    for epoch in (0, 1):
        seen, rank_batches, summaries = [], [], []
        for rank in (0, 1):
            ds = stream(root, tiny_tokenizer, rank=rank, world=2, shuffle_buffer=5)
            ds.set_epoch(epoch)
            got = batches(ds, tiny_tokenizer)
            rank_batches.append(got)
            seen += [k for b in got for k in b if k is not None]
            summaries.append(ds.skipped)
        assert Counter(seen) == Counter(good)  # each good sample exactly once over ranks x workers
        s = merge_summaries(summaries)  # counts made in the DataLoader workers are all here
        assert s["counts"] == {"corrupt image": 3, "missing caption": 1, "truncated tar": 1}
        if epoch == 0:
            order0 = rank_batches
    assert order0 != rank_batches  # another epoch, another shard order and shuffle


def test_bad_samples_are_named_with_shard_and_key(shards, tiny_tokenizer, caplog):
    root, good = shards
    ds = stream(root, tiny_tokenizer)
    with caplog.at_level(logging.WARNING):
        got = batches(ds, tiny_tokenizer, num_workers=0)
    assert Counter(k for b in got for k in b if k is not None) == Counter(good)
    named = {e["where"] for e in ds.skips.events()}
    assert {f"{root / k[:5]}.tar:{k}" for k in CORRUPT | {NO_TXT}} <= named
    assert str(root / f"{TRUNCATED:05d}.tar") in named
    log = "\n".join(r.getMessage() for r in caplog.records)
    for k in CORRUPT | {NO_TXT}:
        assert f"{k[:5]}.tar:{k}" in log
    assert "truncated tar" in log


def test_stream_sample_equals_map_style_sample(shards, tiny_tokenizer, tmp_path):
    root, _ = shards
    enc = make_caption_encoder(tiny_tokenizer, N, fmt="plain", clean=False)
    ds = ShardStream(str(root / "00000.tar"), enc, to_tensor, rank=0, world=1, shuffle_buffer=0)
    first = next(iter(ds))
    (tmp_path / "a.jpg").write_bytes(jpeg(0))
    ref = MultimodalDataset([CaptionRecord(tmp_path / "a.jpg", "a photo 000000000")], enc, to_tensor)[0]
    assert first["input_ids"] == ref["input_ids"] and first["labels"] == ref["labels"]
    assert torch.equal(first["pixel_values"], ref["pixel_values"])


def test_shard_sizes_from_headers_match_the_stream(shards):
    root, _ = shards
    for s in range(SHARDS):
        url = str(root / f"{s:05d}.tar")
        streamed = sum(1 for _ in wds.tarfile_samples([{"url": url}], handler=lambda e: True))
        assert count_shard_samples(url) == streamed == (5 if s == TRUNCATED else PER_SHARD)
        assert count_shard_samples(f"pipe:cat {url}") == streamed  # a non-local URL: read through


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_remaining_batches(shards, tiny_tokenizer, num_workers):
    root, _ = shards
    # rank 1 of 2 holds 3 shards, one truncated: its 2 workers hold 13 and 8 samples (uneven,
    # so the loader passes over an exhausted worker near the end)
    full = stream(root, tiny_tokenizer, rank=1, world=2, shuffle_buffer=4)
    full.set_epoch(2)
    ref = batches(full, tiny_tokenizer, num_workers=num_workers)
    assert len(ref) >= 7
    for k in (1, 2, 3, len(ref) - 2, len(ref)):
        ds = stream(root, tiny_tokenizer, rank=1, world=2, shuffle_buffer=4)
        ds.set_epoch(2)
        ds.set_resume(k, 3)
        assert batches(ds, tiny_tokenizer, num_workers=num_workers) == ref[k:], k
    ds.set_epoch(3)  # a new epoch starts from its beginning
    assert sum(len(b) for b in batches(ds, tiny_tokenizer, num_workers=num_workers)) == sum(len(b) for b in ref)


def test_resume_does_not_decode_consumed_samples(shards, tiny_tokenizer, monkeypatch):
    import mmalign.data.stream as stream_mod

    root, _ = shards
    decoded = []
    monkeypatch.setattr(stream_mod, "load_image", lambda f: decoded.append(1) or Image.open(f).convert("RGB"))
    ds = stream(root, tiny_tokenizer)
    ds.set_resume(10, 3)  # 30 of 45 samples consumed
    n = sum(len(b) for b in batches(ds, tiny_tokenizer, num_workers=0))
    assert n == 15 and len(decoded) <= n


# ------------------------------------------------------------------------------------------- mixing


class Labelled(StreamDataset):
    """A stream of (name, i) items split over workers, to test the mixing logic alone."""

    def __init__(self, name, n, **kw):
        super().__init__(**kw)
        self.name, self.n, self.skips = name, n, SkipCounter()

    def _count(self, worker, num_workers):
        return len(range(self.rank + self.world * worker, self.n, self.world * num_workers))

    def _items(self, worker, num_workers, skip):
        for i in list(range(self.rank + self.world * worker, self.n, self.world * num_workers))[skip:]:
            yield (self.name, i)


def mix(group=1, seed=0, sizes=(11500, 1400), rank=0, world=1):
    srcs = [Labelled(n, s, rank=rank, world=world) for n, s in zip("AB", sizes)]
    return MixedStream(srcs, [115, 14], group=group, seed=seed)


def test_mixing_ratios_and_determinism():
    items = list(mix())
    share = Counter(name for name, _ in items)["A"] / len(items)
    assert abs(share - 115 / 129) < 0.02, share
    assert len(items) > 10000  # the epoch ends when the first source runs out, near the end of both
    assert len(set(items)) == len(items)  # without replacement within an epoch
    assert items == list(mix())
    m = mix()
    m.set_epoch(1)
    assert list(m) != items and list(mix(seed=1)) != items


def test_each_batch_from_one_source_with_workers_and_resume():
    def run(m, k=0):
        m.set_epoch(4)
        if k:
            m.set_resume(k, 8)
        return list(DataLoader(m, batch_size=8, num_workers=2, collate_fn=list))

    ref = run(mix(group=8, sizes=(920, 112)))
    assert all(len({name for name, _ in b}) == 1 for b in ref)
    names = Counter(b[0][0] for b in ref)
    assert names["A"] > 4 * names["B"] > 0
    for k in (1, 5, len(ref) - 1):
        assert run(mix(group=8, sizes=(920, 112)), k) == ref[k:]


def test_mixed_stream_of_map_style_sources(tiny_tokenizer):
    """JSON sources mix with shards through IndexStream; ranks split the indices."""
    enc = make_caption_encoder(tiny_tokenizer, N, fmt="plain", clean=False)
    img = Image.new("RGB", (8, 8))
    ds = MultimodalDataset([CaptionRecord(img, f"c {i}", key=str(i)) for i in range(20)], enc, to_tensor)
    seen = []
    for rank in (0, 1):
        m = MixedStream([IndexStream(ds, rank=rank, world=2, seed=1)], [1.0])
        seen += [tiny_tokenizer.decode([t for t, lab in zip(s["input_ids"], s["labels"]) if lab >= 0]) for s in m]
    assert sorted(seen) == sorted(f"c {i}\n" for i in range(20))
    b = collate(list(m)[:3], tiny_tokenizer.pad_token_id)
    assert b["pixel_values"].shape == (3, 3, 4, 4)


def test_rank_from_environment(monkeypatch, shards, tiny_tokenizer):
    root, _ = shards
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    enc = make_caption_encoder(tiny_tokenizer, N)
    ds = ShardStream(str(root), enc, to_tensor)  # a folder of shards
    assert (ds.rank, ds.world) == (1, 3) and len(ds.urls) == SHARDS
    with pytest.raises(ValueError, match="rank 3"):
        ShardStream(str(root), enc, to_tensor, rank=3, world=3)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_header_scan_handles_long_names_dirs_and_meta(tmp_path, fmt):
    path = tmp_path / "x.tar"
    long_dir = "d" * 120  # > 100 characters: a GNU long name, a pax path, or ustar's prefix field
    with tarfile.open(path, "w", format=fmt) as t:

        def add(name, data=b"x"):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))

        t.addfile(tarfile.TarInfo("e" * 90), None)  # no extension: not a sample member
        dir_info = tarfile.TarInfo("sub")
        dir_info.type = tarfile.DIRTYPE
        t.addfile(dir_info)
        add("__meta__", b"m")
        for i in range(3):
            add(f"{long_dir}/k{i}.jpg", jpeg(i))
            add(f"{long_dir}/k{i}.txt", "ünïcode".encode())
        add("ünï.txt")
    streamed = sum(1 for _ in wds.tarfile_samples([{"url": str(path)}], handler=lambda e: True))
    assert count_shard_samples(str(path)) == streamed == 4


def test_missing_shard_is_named_not_fatal(shards, tiny_tokenizer):
    root, good = shards
    enc = make_caption_encoder(tiny_tokenizer, N, fmt="plain", clean=False)
    ds = ShardStream([str(root / "00000.tar"), str(root / "00404.tar")], enc, to_tensor, rank=0, world=1)
    keys = [key_of(s, tiny_tokenizer) for s in ds if s is not None]
    assert sorted(keys) == sorted(k for k in good if k.startswith("00000"))
    assert ds.skipped["counts"] == {"unreadable tar": 1} and "00404.tar" in ds.skipped["examples"]["unreadable tar"][0]


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def test_a_file_that_is_not_a_tar_is_not_called_truncated(tmp_path, tiny_tokenizer):
    """An HTML error page or an empty file saved as .tar is "not a tar file"; a shard cut short
    (here a .tar.gz whose gzip stream ends early, read through webdataset) is "truncated tar"."""
    write_shard(tmp_path / "good.tar", [{"__key__": "k0", "jpg": jpeg(0), "txt": "a photo k0"}])
    (tmp_path / "page.tar").write_text("<html><body>404 Not Found</body></html>\n" * 30)
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "fake.tar.gz").write_bytes(gzip.compress(b"<html>not a tar</html>" * 40))
    packed = gzip.compress((tmp_path / "good.tar").read_bytes())
    (tmp_path / "cut.tar.gz").write_bytes(packed[: len(packed) // 2])  # its one sample cut off, whatever the mtimes
    urls = [str(tmp_path / n) for n in ("good.tar", "page.tar", "empty.tar", "fake.tar.gz", "cut.tar.gz")]
    enc = make_caption_encoder(tiny_tokenizer, N, fmt="plain", clean=False)
    ds = ShardStream(urls, enc, to_tensor, rank=0, world=1, shuffle_buffer=0)
    assert sum(s is not None for s in ds) == 1
    shards = [e for e in ds.skips.events() if ":" not in Path(e["where"]).name]  # not the cut shard's samples
    reasons = {Path(e["where"]).name: e["reason"] for e in shards}
    assert reasons == {
        "page.tar": "not a tar file",
        "empty.tar": "not a tar file",
        "fake.tar.gz": "not a tar file",
        "cut.tar.gz": "truncated tar",
    }


def test_shard_image_errors_name_the_shard_member(tmp_path, tiny_tokenizer, caplog):
    """PIL names an in-memory image `<_io.BytesIO object at 0x...>`: the message names shard:key.ext."""
    shard = tmp_path / "00000.tar"
    write_shard(shard, [{"__key__": "000000007", "jpg": b"these bytes are no JPEG", "txt": "a photo"}])
    enc = make_caption_encoder(tiny_tokenizer, N, fmt="plain", clean=False)
    with caplog.at_level(logging.WARNING):
        assert list(ShardStream(str(shard), enc, to_tensor, rank=0, world=1)) == [None]
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{shard}:000000007: corrupt image" in log and f"{shard}:000000007.jpg" in log
    assert "BytesIO" not in log
