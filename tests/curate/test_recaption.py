"""recaption under torchrun --nproc_per_node 2 on CPU: every shard written exactly once with the
new caption beside the old members, the corrupt image counted and passed through, finished
shards skipped on rerun."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import webdataset as wds
import yaml

from mmalign.curate.config import CurateConfig, RecaptionConfig
from mmalign.curate.recaption import run_recaption
from mmalign.data import toyworld as tw

from .conftest import subprocess_env

N_SHARDS, PER_SHARD = 5, 3
CORRUPT = ("00002", "s00002_001")  # (shard, key) of the one broken image


def write_shards(folder: Path) -> str:
    folder.mkdir()
    for s in range(N_SHARDS):
        with wds.TarWriter(str(folder / f"{s:05d}.tar"), encoder=False) as w:
            for k in range(PER_SHARD):
                key = f"s{s:05d}_{k:03d}"
                buf = io.BytesIO()
                tw.render(tw.make_scene(s * 10 + k)).save(buf, "JPEG")
                image = b"\xff\xd8\xff\xe0 broken" if (f"{s:05d}", key) == CORRUPT else buf.getvalue()
                meta = json.dumps({"key": key, "caption": f"alt text {key}"}).encode()
                w.write({"__key__": key, "jpg": image, "txt": f"alt text {key}".encode(), "json": meta})
    (folder / "00000_stats.json").write_text("{}")  # img2dataset writes these beside the shards
    return str(folder / "{00000..00004}.tar")


def read_shard(path: Path) -> list[dict]:
    return list(wds.tarfile_samples([{"url": str(path)}]))


def torchrun(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "mmalign.cli", "curate", "recaption", str(config)]
    return subprocess.run(cmd, env=subprocess_env(), cwd=cwd, capture_output=True, text=True, timeout=600)


def test_two_ranks_write_every_shard_once_and_a_rerun_skips_them(tmp_path, toy_folder):
    pattern = write_shards(tmp_path / "in")
    out = tmp_path / "out"
    rc = {"shards": pattern, "out": str(out), "model": str(toy_folder), "max_new_tokens": 8, "batch_size": 2}
    config = tmp_path / "recaption.yaml"
    config.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "recaption": rc}))

    first = torchrun(config, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    tally = json.loads(first.stdout[first.stdout.index("{") :])
    assert tally["ranks"] == 2 and tally["shards_written"] == N_SHARDS and tally["shards_skipped"] == 0
    assert (tally["samples"], tally["captioned"], tally["corrupt"]) == (15, 14, 1)
    assert tally["images_per_s"] > 0 and "img/s" in first.stderr  # the progress bars show images/s

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{s:05d}.tar" for s in range(N_SHARDS)] + [f"{s:05d}.tar.done.json" for s in range(5)])
    for s in range(N_SHARDS):
        samples = read_shard(out / f"{s:05d}.tar")
        assert [x["__key__"] for x in samples] == [f"s{s:05d}_{k:03d}" for k in range(PER_SHARD)]
        for x in samples:
            assert x["txt"] == f"alt text {x['__key__']}".encode() and b"alt text" in x["json"]  # old members kept
            assert ("recap.txt" in x) == ((f"{s:05d}", x["__key__"]) != CORRUPT)
    assert all(json.loads((out / f"{s:05d}.tar.done.json").read_text())["samples"] == 3 for s in range(N_SHARDS))

    (out / "00003.tar.done.json").unlink()  # as if rank 1 was killed before marking this shard
    second = torchrun(config, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(second.stdout[second.stdout.index("{") :])
    assert (again["shards_written"], again["shards_skipped"], again["samples"]) == (1, 4, 3)
    assert len(read_shard(out / "00003.tar")) == PER_SHARD


def test_a_caption_a_rule_drops_is_counted_not_written(tmp_path):
    pattern = write_shards(tmp_path / "in")
    cfg = CurateConfig(workdir=str(tmp_path / "w"))
    cfg.recaption = RecaptionConfig(
        shards=pattern, out=str(tmp_path / "out"), rules=[{"name": "repeated_sentences", "max_rate": 0.0}]
    )
    looped = "A red circle. A red circle. A red circle."
    tally = run_recaption(cfg, lambda images: [looped] * len(images), rank=0, world=1)
    assert tally["dropped_by_rule"] == {"repeated_sentences": 14} and tally["captioned"] == 0
    assert all("recap.txt" not in x for x in read_shard(tmp_path / "out" / "00000.tar"))


def test_recaption_through_endpoints_one_per_rank(tmp_path):
    from .fake_openai import FakeOpenAI

    pattern = write_shards(tmp_path / "in")
    servers = [FakeOpenAI(), FakeOpenAI()]
    try:
        cfg = CurateConfig(workdir=str(tmp_path / "w"))
        cfg.recaption = RecaptionConfig(
            shards=pattern, out=str(tmp_path / "out"), backend="openai", base_urls=[s.url for s in servers]
        )
        cfg.recaption.endpoint.model, cfg.recaption.endpoint.backoff_s = "captioner", 0.01
        for rank in (0, 1):
            run_recaption(cfg, rank=rank, world=2)
    finally:
        for s in servers:
            s.stop()
    assert [s.requests for s in servers] == [8, 6]  # shards 0, 2, 4 (one image corrupt) to rank 0; 1, 3 to rank 1
    first = read_shard(tmp_path / "out" / "00001.tar")[0]
    assert first["recap.txt"] == f"FIXED {cfg.recaption.prompt}".encode()
    body = servers[1].bodies[0]["messages"][0]["content"]
    assert body[0]["text"] == cfg.recaption.prompt and body[1]["image_url"]["url"].startswith("data:image/png")


def test_a_server_dying_mid_run_leaves_its_shards_unfinished_and_the_rerun_completes_them(tmp_path):
    from .fake_openai import FakeOpenAI

    pattern = write_shards(tmp_path / "in")
    cfg = CurateConfig(workdir=str(tmp_path / "w"))
    out = tmp_path / "out"

    def run(server):
        cfg.recaption = RecaptionConfig(shards=pattern, out=str(out), backend="openai", base_urls=[server.url])
        cfg.recaption.endpoint.model, cfg.recaption.endpoint.backoff_s = "captioner", 0.01
        cfg.recaption.endpoint.max_attempts = 2
        try:
            return run_recaption(cfg, rank=0, world=1)
        finally:
            server.stop()

    first = run(FakeOpenAI(die_after=4))  # shard 0 (3 images) answered, shard 1 dies after its first image
    assert first["shards_written"] == 1 and first["stopped"] and first["shards_unfinished"] == 4
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]  # nothing half-captioned is kept
    assert not list(out.glob("*.tmp"))
    second = run(FakeOpenAI())
    assert (second["shards_written"], second["shards_skipped"], second["stopped"]) == (4, 1, [])
    captioned = [s for n in range(N_SHARDS) for s in read_shard(out / f"{n:05d}.tar") if "recap.txt" in s]
    assert len(captioned) == N_SHARDS * PER_SHARD - 1  # every image but the corrupt one, each once
