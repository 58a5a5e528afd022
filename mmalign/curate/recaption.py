"""Step 6, recaption (ShareGPT4V style): caption every image of a set of webdataset shards
(img2dataset output) and write new shards with the caption added, the old members kept.

- Rank ``r`` of ``world`` takes shards ``r, r + world, ...`` of the sorted list: launch with
  ``torchrun --nproc_per_node N -m mmalign.cli curate recaption ...`` or ``accelerate launch``
  (they set RANK / WORLD_SIZE); no process talks to another until the final tally.
- A shard is written to ``<name>.tmp``, renamed, then marked by ``<name>.done.json`` (its
  counts); a marked shard is skipped on rerun, an unmarked one is written again from scratch,
  so every shard is in the output exactly once.
- A corrupt image is counted and its sample passed through without a new caption; an image
  the endpoint gave no caption for (timeouts, 5xx after retries) leaves its shard unfinished:
  not renamed, not marked, redone by the next run; a spent budget or a server that stopped
  answering ends this rank's run there (the shards left are redone next time). A caption a
  rule drops (e.g. one sentence repeated, the failure users of ShareCaptioner report) is not
  written, and counted per rule.
- Backends: a local model (batched ``generate_batch``) or an OpenAI-compatible endpoint
  (``recaption.base_urls``: rank r uses the r-th server modulo their number, so many vLLM
  servers share the work).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mmalign.curate.config import CurateConfig, RecaptionConfig
from mmalign.curate.describe import UNREADABLE_IMAGE
from mmalign.curate.endpoint import ChatEndpoint, EndpointError, image_part, run_concurrently
from mmalign.curate.filters import Rule, apply_rules, parse_rules
from mmalign.curate.store import write_json_atomic

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
Captioner = Callable[[Sequence[Image.Image]], list[str | None]]  # None: no caption for that image
STOPS_THE_RUN = ("budget spent", "unreachable", "connection error")  # no later request can succeed


def local_captioner(cfg: RecaptionConfig) -> Captioner:
    from mmalign.chat.generate import generate_batch
    from mmalign.model.bundle import LoadedModel
    from mmalign.prompts import user_with_image

    if not cfg.model:
        raise ValueError("recaption.model: the local backend needs a model folder")
    loaded = LoadedModel.load(cfg.model, template=cfg.template, dtype=cfg.dtype, device=cfg.device)
    turns = [{"role": "user", "content": user_with_image(loaded.template, cfg.prompt)}]
    gen = {
        "max_new_tokens": cfg.max_new_tokens,
        "num_beams": cfg.num_beams,
        "repetition_penalty": cfg.repetition_penalty,
    }

    def caption(images: Sequence[Image.Image]) -> list[str | None]:
        return list(generate_batch(loaded, [(im, turns) for im in images], system=cfg.system, **gen))

    return caption


def endpoint_captioner(cfg: RecaptionConfig, rank: int, api_key: str | None = None) -> Captioner:
    endpoint_cfg = cfg.endpoint
    if cfg.base_urls:
        endpoint_cfg = replace(endpoint_cfg, base_url=cfg.base_urls[rank % len(cfg.base_urls)])
    endpoint = ChatEndpoint(endpoint_cfg, api_key)
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []

    def one(image: Image.Image) -> str:
        ask = {"role": "user", "content": [{"type": "text", "text": cfg.prompt}, image_part(image)]}
        return endpoint.chat([*system, ask], cfg.max_new_tokens).text

    def caption(images: Sequence[Image.Image]) -> list[str | None]:
        out: dict[int, str | None] = {}
        for i, text, error in run_concurrently(range(len(images)), lambda i: one(images[i]), endpoint_cfg.concurrency):
            if error is not None and (not isinstance(error, EndpointError) or error.kind in STOPS_THE_RUN):
                raise error
            if error is not None:
                log.warning("recaption: image %d of a batch of %d: %s", i, len(images), error)
            out[i] = text
        return [out[i] for i in range(len(images))]

    return caption


def _decode(sample: dict[str, Any]) -> Image.Image | None:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        return None
    with Image.open(io.BytesIO(sample[key])) as im:
        return im.convert("RGB")


def _member_bytes(sample: dict[str, Any]) -> dict[str, bytes]:
    return {k: v if isinstance(v, bytes) else str(v).encode() for k, v in sample.items() if not k.startswith("__")}


def recaption_shard(
    url: str, target: Path, caption: Captioner, cfg: RecaptionConfig, rules: list[Rule], bar: tqdm
) -> dict[str, Any]:
    """One shard -> ``target`` (written under a temporary name, then renamed); its counts."""
    stats: Counter = Counter()
    dropped: Counter = Counter()
    tmp = target.with_name(target.name + ".tmp")
    started = time.monotonic()
    try:
        _write_shard(url, tmp, caption, cfg, rules, bar, stats, dropped)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a stopped run keeps no half-written shard
        raise
    if stats["no_caption"]:
        tmp.unlink()
    else:
        os.replace(tmp, target)
    seconds = time.monotonic() - started
    return {"shard": url, **stats, "dropped_by_rule": dict(dropped), "seconds": round(seconds, 2)}


def _write_shard(
    url: str,
    tmp: Path,
    caption: Captioner,
    cfg: RecaptionConfig,
    rules: list[Rule],
    bar: tqdm,
    stats: Counter,
    dropped: Counter,
) -> None:
    import webdataset as wds

    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False)
        batch: list[tuple[dict[str, Any], Image.Image | None]] = []

        def flush() -> None:
            images = [im for _, im in batch if im is not None]
            texts = iter(caption(images) if images else [])
            for sample, image in batch:
                members = {"__key__": sample["__key__"], **_member_bytes(sample)}
                text = next(texts) if image is not None else None
                rule = apply_rules(rules, text)[0] if text else None
                if text and rule is None:
                    members[cfg.key] = text.encode("utf-8")
                    stats["captioned"] += 1
                elif text:
                    dropped[rule] += 1
                elif image is not None:
                    stats["no_caption"] += 1  # the endpoint gave none: the shard stays unfinished
                    log.warning(
                        "%s:%s: no caption from the endpoint; the shard is redone next run", url, sample["__key__"]
                    )
                writer.write(members)
                stats["samples"] += 1
            bar.update(len(batch))
            batch.clear()

        for sample in wds.tarfile_samples([{"url": url}]):
            try:
                image = _decode(sample)
                stats["no_image"] += image is None
            except UNREADABLE_IMAGE as e:
                log.warning("%s:%s: corrupt image (%s); passed through without a caption", url, sample["__key__"], e)
                image, stats["corrupt"] = None, stats["corrupt"] + 1
            batch.append((sample, image))
            if len(batch) == cfg.batch_size:
                flush()
        if batch:
            flush()
        writer.close()


def run_recaption(
    cfg: CurateConfig,
    caption: Captioner | None = None,
    *,
    rank: int | None = None,
    world: int | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """This rank's shards, each once; returns (and on rank 0 prints) the tally of all ranks."""
    from mmalign.curate.steps import rank_world
    from mmalign.data.stream import count_shard_samples, expand_shards

    rc = cfg.recaption
    if not rc.shards or not rc.out:
        raise ValueError("recaption: set recaption.shards (input shards) and recaption.out (output folder)")
    rank, world = rank_world(rank, world)
    shards = sorted(expand_shards(rc.shards))
    names = Counter(Path(u).name for u in shards)
    if clashes := sorted(n for n, k in names.items() if k > 1):
        raise ValueError(f"recaption.shards: shards from different folders share the names {clashes[:5]}")
    mine = shards[rank::world]
    out = Path(rc.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [u for u in mine if not (out / f"{Path(u).name}.done.json").exists()]
    rules = parse_rules(rc.rules, "recaption.rules") if rc.rules else []
    if caption is None:
        caption = endpoint_captioner(rc, rank, api_key) if rc.backend == "openai" else local_captioner(rc)
    total = sum(count_shard_samples(u) for u in todo)
    finished: list[dict[str, Any]] = []  # the counts of the shards written and marked this run
    stopped: str | None = None
    with tqdm(total=total, desc=f"recaption rank {rank}", unit="img", dynamic_ncols=True) as bar:
        for url in todo:
            try:
                stats = recaption_shard(url, out / Path(url).name, caption, rc, rules, bar)
            except EndpointError as e:
                stopped = f"{url}: {e}"
                log.error("recaption rank %d stopped at %s; rerun to finish the shards left", rank, stopped)
                break
            if not stats.get("no_caption"):
                write_json_atomic(out / f"{Path(url).name}.done.json", stats)
                finished.append(stats)
    tally = _tally(finished, skipped=len(mine) - len(todo), unfinished=len(todo) - len(finished))
    tally["stopped"] = [stopped] if stopped else []
    everyone = _gather(tally)
    if rank == 0:
        print(json.dumps(everyone, indent=1))
    return everyone


SUMMED = ("samples", "captioned", "corrupt", "no_image", "shards_written", "shards_skipped", "shards_unfinished")


def _tally(finished: list[dict[str, Any]], skipped: int, unfinished: int) -> dict[str, Any]:
    out: dict[str, Any] = {k: sum(s.get(k, 0) for s in finished) for k in SUMMED[:4]}
    out["dropped_by_rule"] = dict(sum((Counter(s["dropped_by_rule"]) for s in finished), Counter()))
    out["shards_written"], out["shards_skipped"], out["shards_unfinished"] = len(finished), skipped, unfinished
    seconds = sum(s["seconds"] for s in finished)
    out["images_per_s"] = round(out["samples"] / seconds, 2) if seconds else None
    return out


def _gather(tally: dict[str, Any]) -> dict[str, Any]:
    """All ranks' tallies summed (a gloo all-gather when launched by torchrun / accelerate)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return {**tally, "ranks": 1}
    started = dist.is_initialized()
    if not started:
        dist.init_process_group("gloo")
    try:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, tally)
    finally:
        if not started:
            dist.destroy_process_group()
    total = {**_tally([], 0, 0), "stopped": []}
    for p in parts:
        for k in SUMMED:
            total[k] += p[k]
        total["stopped"] += p["stopped"]
        total["dropped_by_rule"] = dict(Counter(total["dropped_by_rule"]) + Counter(p["dropped_by_rule"]))
    speeds = [p["images_per_s"] for p in parts if p["images_per_s"]]
    total["images_per_s"] = round(sum(speeds), 2) if speeds else None  # ranks run side by side
    return {**total, "ranks": len(parts)}


__all__ = ["endpoint_captioner", "local_captioner", "recaption_shard", "run_recaption"]
