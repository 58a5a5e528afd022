"""Tiny on-disk datasets and run configs shared by the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mmalign.config import load_config

PROJECTOR = "model.multi_modal_projector."
CAPTIONS = [
    "a red circle above a blue square",
    "a green triangle left of a small yellow star",
    "there are three shapes",
    "a blue square",
    "a small yellow star",
]
COLORS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (240, 220, 20), (120, 120, 120)]


def _image(path: Path, color, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color)[None, None] + rng.integers(-20, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def caption_data(root: Path, n: int = 5) -> Path:
    """`[{"image": "images/i.jpg", "caption": ...}]` with n records."""
    recs = []
    for i in range(n):
        _image(root / "images" / f"{i}.jpg", COLORS[i % len(COLORS)], seed=i)
        recs.append({"image": f"images/{i}.jpg", "caption": CAPTIONS[i % len(CAPTIONS)]})
    path = root / "caps.json"
    path.write_text(json.dumps(recs))
    return path


def cc_sbu_align(root: Path, n: int = 4) -> Path:
    """MiniGPT-4's stage-2 layout: filter_cap.json + image/{image_id}.jpg."""
    anns = []
    for i in range(n):
        _image(root / "image" / f"{100 + i}.jpg", COLORS[i % len(COLORS)], seed=10 + i)
        anns.append({"image_id": str(100 + i), "caption": CAPTIONS[i % len(CAPTIONS)].capitalize() + "."})
    path = root / "filter_cap.json"
    path.write_text(json.dumps({"annotations": anns}))
    return path


def config(model_dir: Path, data: Path, out: Path, *overrides: str):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.path={data}",
            f"train.output_dir={out}",
            "train.batch_size=2",
            "train.lr=1e-2",
            "train.min_lr=1e-3",
            "train.log_every=1",
            *overrides,
        ],
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(out: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run re-logs the steps after its checkpoint)."""
    return {m["step"]: m["loss"] for m in metrics(out)}


def caption_shards(root: Path, shards: int = 2, per_shard: int = 3, corrupt: frozenset[str] = frozenset()) -> Path:
    """img2dataset-layout shards (key.jpg + key.txt); the keys in ``corrupt`` get half a JPEG."""
    import io

    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for j in range(per_shard):
                key, buf = f"{s:05d}{j:04d}", io.BytesIO()
                Image.new("RGB", (40, 40), COLORS[(s + j) % len(COLORS)]).save(buf, "JPEG")
                jpg = buf.getvalue()[: len(buf.getvalue()) // 2] if key in corrupt else buf.getvalue()
                sink.write({"__key__": key, "jpg": jpg, "txt": CAPTIONS[(s + j) % len(CAPTIONS)]})
    return root
