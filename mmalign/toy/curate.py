"""The toy main job's curation: the stage-1 model makes its own stage-2 set, as MiniGPT-4 did.

describe (the stage-1 model, in-process) -> fix (the toy fix LLM served by ``mmalign serve`` and
called over HTTP through the same OpenAI-compatible path a user points at ChatGPT or vLLM) ->
filter (the rules of ``configs/curate_toy.yaml``) -> review -> export.

The review is done by an **oracle** that stands in for the paper's person: it checks every
sentence against the scene's exact objects. It accepts a description whose every sentence is
true and that names every object; it edits one whose object sentences are all true and
complete by deleting its false count or relation sentences; it rejects the rest (a wrong or
missing object, a sentence it cannot read). The real page (``mmalign curate review``) is for
real data.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from mmalign.data import toyworld as tw

CONFIG = Path(__file__).resolve().parent.parent.parent / "configs" / "curate_toy.yaml"
FIX_MODEL = Path(__file__).resolve().parent.parent / "assets" / "toy" / "fix"


def write_curated_images(folder: Path, n: int) -> Path:
    """``n`` toy scenes of the ``curated`` split as JPEG files named by their seed."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed in tqdm(tw.split_seeds("curated", n), desc="toy curated images", unit="img"):
        path = folder / f"{seed}.jpg"
        if not path.exists():
            tw.render(tw.make_scene(seed)).save(path, quality=95)
    return folder


def _relation_true(scene: tw.Scene, m: re.Match) -> bool:
    a = [o for o in scene.objects if (o.colour, o.shape) == (m[1], m[2])]
    b = [o for o in scene.objects if (o.colour, o.shape) == (m[4], m[5])]
    if len(a) != 1 or len(b) != 1 or a[0] is b[0]:
        return False
    if m[3] == "above":
        return a[0].row < b[0].row
    return a[0].col < b[0].col


def _match(scene: tw.Scene, said: list[tuple[str, ...]]) -> list[bool]:
    """Which object sentences (size, colour, shape, position) name a scene object, one object
    per sentence; exact matches are paired first, then colour + shape alone."""
    free = list(scene.objects)
    fits = [False] * len(said)
    for exact in (True, False):
        for i, (size, colour, shape, position) in enumerate(said):
            if fits[i]:
                continue
            hit = next(
                (
                    o
                    for o in free
                    if (o.colour, o.shape) == (colour, shape)
                    and (not exact or (o.size, o.position) == (size, position))
                ),
                None,
            )
            if hit is not None:
                free.remove(hit)
                fits[i] = True
    return fits


def judge(text: str, scene: tw.Scene) -> tuple[str, str, str]:
    """(decision, the text as kept, why): the oracle's check of one description.

    Objects are checked by colour and shape, one scene object per sentence; sizes and positions
    are not (the toy LLM answers where an object is about half the time even from text), nor
    can an edit add anything: it only deletes sentences that do not fit the image."""
    parts = tw.sentences(text)
    said, keep = [], [True] * len(parts)
    for i, s in enumerate(parts):
        parsed = tw.parse_sentence(s)
        if parsed is None:
            return "rejected", text, f"cannot read: {s!r}"
        form, m = parsed
        if form == "object":
            said.append((i, tuple(m.groups())))
        elif form == "count":
            keep[i] = tw.NUMBER_WORDS.index(m[1]) == len(scene.objects)
        else:
            keep[i] = _relation_true(scene, m)
    for (i, _), fits in zip(said, _match(scene, [obj for _, obj in said])):
        keep[i] = fits
    named = sum(keep[i] for i, _ in said)
    if named < len(scene.objects):
        return "rejected", text, f"names {named} of the {len(scene.objects)} objects"
    if all(keep):
        return "accepted", text, "every sentence fits the image"
    dropped = [s for s, k in zip(parts, keep) if not k]
    return "edited", " ".join(s for s, k in zip(parts, keep) if k), f"deleted what does not fit: {dropped}"


def oracle_review(cfg, reviewer: str = "oracle") -> dict[str, int]:
    """Decide every record that passed the filters (the scene comes from the file's seed)."""
    from collections import Counter

    from mmalign.curate.review import ReviewDB, review_items

    db, counts = ReviewDB(cfg.db_path), Counter()
    done = db.decisions()
    for item in review_items(cfg):
        if item["id"] in done:
            counts[done[item["id"]]["decision"]] += 1
            continue
        decision, text, _ = judge(item["text"], tw.make_scene(int(Path(item["image"]).stem)))
        db.decide(item["id"], decision, text, reviewer)
        counts[decision] += 1
    return dict(counts)


def accept_all(cfg) -> dict[str, int]:
    from mmalign.curate.review import ReviewDB, review_items

    db = ReviewDB(cfg.db_path)
    items = [it for it in review_items(cfg) if it["id"] not in db.decisions()]
    for item in items:
        db.decide(item["id"], "accepted", item["text"], "accept-all (quick run)")
    return {"accepted": len(items)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fast_bf16() -> bool:
    import torch

    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


@contextlib.contextmanager
def served_fix_model(
    log_file: Path,
    model: Path = FIX_MODEL,
    max_batch_size: int = 64,
    timeout_s: float = 180,
    while_starting: Callable[[], None] | None = None,
) -> Iterator[str]:
    """``mmalign serve --model <fix model>`` in a subprocess (its log in ``log_file``); yields its
    ``/v1`` base URL. ``while_starting`` runs while the server imports and loads (~10 s, mostly
    one core), before its health is awaited. In bf16 where the CPU has bf16 instructions: the
    fix model's greedy answers to 640 of the main job's descriptions were the same as in
    float32, a batch ~1.35x faster (AMX); elsewhere bf16 is emulated and slower."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mmalign.cli", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--max-batch-size", str(max_batch_size), "--served-name", "toy-fix", "--kv-cache", "static"]
    cmd += ["--dtype", "bfloat16" if _fast_bf16() else "float32"]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "ab")
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if while_starting is not None:
            while_starting()
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode} before serving; see {log_file}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the fix model server did not answer at {url} in {timeout_s:.0f} s") from None
                time.sleep(0.5)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def curate_toy(out: Path, stage1: Path, n_images: int, quick: bool = False) -> tuple[Path, dict]:
    """The whole pipeline on ``n_images`` curated-split scenes; returns the export folder and
    the funnel. Every step is resumable: a killed main job picks up where it stopped. ``quick``
    (a smoke run on an untrained stage 1): the review accepts whatever passed the filters."""
    from mmalign.curate.config import load_curate_config
    from mmalign.curate.describe import describer_for
    from mmalign.curate.endpoint import ChatEndpoint
    from mmalign.curate.export import funnel, run_export
    from mmalign.curate.steps import run_describe, run_filter, run_fix

    images = write_curated_images(out / "images", n_images)
    base = (f"workdir={out}", f"images={images}", f"describe.model={stage1}")
    cfg = load_curate_config(CONFIG, base)
    describe = lambda: run_describe(cfg, describer_for(cfg), rank=0, world=1)  # noqa: E731
    with served_fix_model(out / "fix_server.log", while_starting=describe) as base_url:
        cfg.fix.endpoint.base_url = base_url
        run_fix(cfg, ChatEndpoint(cfg.fix.endpoint), rank=0, world=1)
    run_filter(cfg)
    print("review:", accept_all(cfg) if quick else oracle_review(cfg))
    return run_export(cfg), funnel(cfg)


__all__ = ["CONFIG", "FIX_MODEL", "curate_toy", "judge", "oracle_review", "served_fix_model", "write_curated_images"]
