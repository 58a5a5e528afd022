"""Stage-1 step from cached features vs from images, with the step's ceiling, in one run.

Four pieces are timed side by side on the same model, data and batch (projector-only stage 1):

- recompute: a training step as before the cache: read + decode + transform the batch's JPEGs,
  run the frozen part, project, LLM forward + backward, AdamW;
- decode: reading + decoding + transforming the batch's images alone;
- frozen: the frozen part's forward alone (vision tower, + Q-Former for MiniGPT-4);
- cached: the step from a feature cache written by `mmalign cache-features` (read, project, LLM, AdamW).

The ceiling of a cached step is recompute - decode - frozen; the target is cached within 10 % of it.
Two models: the toy (`toy-minigpt4`, its own 48 px toy-world JPEGs) and a random model with
MiniGPT-4's proportions scaled down (Blip2: 224 px / 14 -> 257 ViT tokens over 39 blocks, a
12-layer Q-Former with 32 queries, a 32-layer LLM; widths 1408 / 768 / 4096 divided by 16), on
random 320 x 240 photos, where the frozen part's share of a step is larger.

    PYTHONPATH=. python -m bench.feature_cache [--quick]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import Row, Timing, interleaved, section_main, verdict
from mmalign.config import load_config, with_recipe_defaults
from mmalign.data.build import dataset_from_config
from mmalign.data.collate import collate
from mmalign.data.sources import load_image, read_record_image
from mmalign.model import (
    apply_freeze,
    export,
    image_processor_for,
    model_from_config,
    num_image_tokens,
    train_image_transform,
)
from mmalign.model.features import feature_fingerprint, frozen_features
from mmalign.model.inputs import training_inputs
from mmalign.train.feature_cache import cache_features
from mmalign.train.trainable import set_train_modes

CAPTIONS = ["a red circle and a blue square", "two shapes : a green triangle , a yellow star", "simple shapes"]


def minigpt4_scaled(tokenizer_dir: str) -> dict[str, Any]:
    """A ModelSpec's fields: MiniGPT-4's depths and token counts, widths / 16."""
    from mmalign.recipes import ModelSpec

    vision = dict(model_type="blip_2_vision_model", hidden_size=96, intermediate_size=384, num_hidden_layers=39)
    vision.update(num_attention_heads=6, image_size=224, patch_size=14, qkv_bias=True)
    qformer = dict(
        hidden_size=48, num_hidden_layers=12, num_attention_heads=4, intermediate_size=192, cross_attention_frequency=2
    )
    llm = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=32, vocab_size=600)
    llm.update(num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False)
    return ModelSpec(arch="minigpt4", vision=vision, qformer=qformer, llm=llm, tokenizer=tokenizer_dir)


def _photo(seed: int) -> Image.Image:
    """A 320 x 240 image with photo-like JPEG cost (smooth gradients + noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:320]
    base = np.stack([(x * 0.7 + seed) % 256, (y * 0.9) % 256, (x + y) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8))


def write_data(root: Path, n: int, image: Any) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image(i).save(root / "images" / f"{i}.jpg", quality=90)
        records.append({"image": f"images/{i}.jpg", "caption": CAPTIONS[i % len(CAPTIONS)]})
    (root / "captions.json").write_text(json.dumps(records))
    return root / "captions.json"


class Stage1Bench:
    """The four pieces of one model, on one batch (``batch_size`` records), in training mode."""

    def __init__(self, cfg: Any, cache: Path, batch_size: int) -> None:
        self.model, tok = model_from_config(cfg.model)
        frozen = apply_freeze(self.model, "projector").frozen_modules(self.model)
        set_train_modes(self.model, frozen, checkpointing=False)  # as the stage run: frozen towers in eval
        self.transform = train_image_transform(self.model, cfg)
        n_img, pad = num_image_tokens(self.model.config), tok.pad_token_id
        images = dataset_from_config(cfg.data, tok, n_img, self.transform)
        cfg.data.features = str(cache)
        fingerprint = feature_fingerprint(self.model, self.transform)
        features = dataset_from_config(cfg.data, tok, n_img, self.transform, fingerprint=fingerprint)
        self.indices, self.pad, self.pixels = list(range(batch_size)), pad, None
        self.images, self.features = images, features
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)

    def _step(self, batch: dict[str, Any]) -> None:
        loss = self.model(**training_inputs(self.model, batch, "cpu")).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def recompute(self) -> None:
        self._step(collate([self.images[i] for i in self.indices], self.pad))

    def decode(self) -> None:
        for i in self.indices:
            self.transform(read_record_image(self.images.records[i]))

    def frozen(self) -> None:
        if self.pixels is None:  # decoded once: this piece times the frozen forward alone
            self.pixels = torch.stack([self.transform(load_image(self.images.records[i].image)) for i in self.indices])
        with torch.no_grad():
            frozen_features(self.model, self.pixels)

    def cached(self) -> None:
        self._step(collate([self.features[i] for i in self.indices], self.pad))


def measure(name: str, cfg: Any, data_root: Path, batch_size: int, repeats: int) -> tuple[Row, dict[str, Timing]]:
    cache = cache_features(cfg, data_root / "cache", dtype="float16", batch_size=batch_size)
    bench = Stage1Bench(with_recipe_defaults(cfg), cache.folder, batch_size)
    pieces = {"recompute": bench.recompute, "decode": bench.decode, "frozen": bench.frozen, "cached": bench.cached}
    t = interleaved(pieces, repeats)
    ceiling = t["recompute"].best - t["decode"].best - t["frozen"].best
    note = (
        f"batch {batch_size}; decode+transform {t['decode'].best * 1e3:.0f} ms, frozen forward "
        f"{t['frozen'].best * 1e3:.0f} ms, ceiling {ceiling * 1e3:.0f} ms; cached / ceiling "
        f"{t['cached'].best / ceiling:.2f} (target <= 1.10)"
    )
    row = Row(f"stage-1 step, cached features ({name})", "recompute from JPEGs", t["recompute"], t["cached"], "s/step")
    row.note = note
    within = t["cached"].best / ceiling
    row.target = f"cached step within 10 % of its ceiling: {within:.2f} x the ceiling, {verdict(within <= 1.10)}"
    return row, t


def configs(root: Path, quick: bool) -> list[tuple[str, Any, Path, int, int]]:
    """(name, config, data folder, batch size, repeats) of the toy and the scaled MiniGPT-4 model.
    The toy's steps are short (~0.15 s) and its ceiling a difference of three of them: more repeats."""
    from mmalign.data import toyworld
    from mmalign.model import build_model
    from mmalign.recipes import TOY_ASSETS

    n_toy, n_big = (64, 8) if quick else (64, 16)
    toy = root / "toy"
    data = write_data(toy, n_toy, lambda i: toyworld.render(toyworld.make_scene(10_000_000 + i)))
    toy_cfg = load_config(None, ["model.recipe=toy-minigpt4", f"data.path={data}", "data.max_length=64"])
    big = root / "minigpt4"
    data = write_data(big, n_big, _photo)
    torch.manual_seed(0)
    model, tok = build_model(minigpt4_scaled(str(TOY_ASSETS / "llm")))
    export(model, tok, big / "model", image_processor=image_processor_for(model), template="minigpt4_v0")
    big_cfg = load_config(None, [f"model.path={big / 'model'}", f"data.path={data}", "data.max_length=64"])
    toy_repeats, big_repeats = (8, 4) if quick else (15, 8)
    return [
        ("toy-minigpt4", toy_cfg, toy, n_toy, toy_repeats),
        ("MiniGPT-4 proportions, widths / 16", big_cfg, big, n_big, big_repeats),
    ]


def rows(quick: bool = False) -> list[Row]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg, root, batch_size, repeats in configs(Path(tmp), quick):
            row, _ = measure(name, cfg, root, batch_size, repeats)
            out.append(row)
    return out


def main() -> None:
    section_main(__doc__, rows)


if __name__ == "__main__":
    main()
