"""The main job on the embedded default: the MiniGPT-4 method, end to end, on the toy world.

1. write toy data to disk in the published layouts (a caption JSON for stage 1, MiniGPT-4's
   `cc_sbu_align` layout for stage 2) from training seeds;
2. cache the frozen vision tower's features of both stages' images once (`mmalign cache-features`);
3. stage 1: align the projection on short captions (`configs/toy_stage1.yaml`);
4. stage 2: fine-tune it on detailed descriptions in the chat template (`configs/toy_stage2.yaml`);
5. evaluate stage 1 and stage 2 on the same held-out scenes and prompts;
6. print a report and a sample chat answer.

``baseline=True`` (``mmalign toy run --baseline``) trains as mmalign did before the feature cache:
every step decodes its images and runs the vision tower, batches are padded, the loader runs in
the main process (the benchmark times both, docs/performance.md).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmalign.data import toyworld as tw

CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"
STAGE1_PAIRS = 16000
STAGE2_PAIRS = 3500  # MiniGPT-4's curated set is ~3.5k detailed descriptions
BASELINE = ("data.features=null", "data.packing=false", "data.num_workers=0")  # the path before the cache


def write_toy_data(out: Path, n_stage1: int = STAGE1_PAIRS, n_stage2: int = STAGE2_PAIRS) -> dict[str, Path]:
    """Stage-1 captions (`captions.json` + `images/`) and stage-2 `cc_sbu_align` (`filter_cap.json` + `image/`)."""
    rng = random.Random(0)
    s1, s2 = out / "stage1", out / "cc_sbu_align"
    (s1 / "images").mkdir(parents=True, exist_ok=True)
    (s2 / "image").mkdir(parents=True, exist_ok=True)
    records = []
    for seed in tqdm(tw.split_seeds("train", n_stage1), desc="toy stage-1 data", unit="img"):
        scene = tw.make_scene(seed)
        name = f"images/{seed}.jpg"
        tw.render(scene).save(s1 / name, quality=95)
        records.append({"image": name, "caption": tw.caption(scene, rng)})
    (s1 / "captions.json").write_text(json.dumps(records))
    annotations = []
    for seed in tqdm(tw.split_seeds("curated", n_stage2), desc="toy stage-2 data", unit="img"):
        scene = tw.make_scene(seed)
        tw.render(scene).save(s2 / "image" / f"{seed}.jpg", quality=95)
        annotations.append({"image_id": str(seed), "caption": tw.description(scene)})
    (s2 / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    return {"stage1": s1 / "captions.json", "stage2": s2 / "filter_cap.json"}


def main_job(out: Path, quick: bool = False, overrides: tuple[str, ...] = (), baseline: bool = False) -> dict:
    """Data -> feature caches -> stage 1 -> stage 2 -> both exported and evaluated -> report + a sample chat."""
    from mmalign.evaluate.report import write_toy_report

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    data = write_toy_data(out / "data", *((512, 256) if quick else ()))
    steps = ("train.max_steps=4", "train.save_every=2") if quick else ()
    timings = Timings(out / "timings.json")
    speed = {stage: BASELINE for stage in ("stage1", "stage2")}
    if not baseline:
        with timings("feature caches"):
            speed = {stage: cache_stage(config, out, data[stage], overrides) for stage, config in STAGES.items()}
    with timings("stage 1"):
        cfg1, ckpt1 = train_stage(
            "toy_stage1.yaml", out / "stage1", data["stage1"], (*steps, *speed["stage1"], *overrides)
        )
    init = (f"model.init_trainable={ckpt1}", *steps, *speed["stage2"], *overrides)
    with timings("stage 2"):
        cfg2, ckpt2 = train_stage("toy_stage2.yaml", out / "stage2", data["stage2"], init)
    print(f"\ntraining ({'baseline: images, padded' if baseline else 'cached features'}): {timings}")
    n_scenes = 16 if quick else 200
    results = {
        stage: export_and_evaluate(cfg, ckpt, out / f"model-{stage}", out / f"eval-{stage}", n_scenes)
        for stage, cfg, ckpt in (("stage1", cfg1, ckpt1), ("stage2", cfg2, ckpt2))
    }
    print(write_toy_report(results, out, minutes=(time.time() - t0) / 60))
    sample_chat(out / "model-stage2")
    print(f"\nmain job finished in {(time.time() - t0) / 60:.1f} min; model: {out / 'model-stage2'}")
    return results


STAGES = {"stage1": "toy_stage1.yaml", "stage2": "toy_stage2.yaml"}


class Timings:
    """Wall seconds per named step of the main job, kept in ``path`` as they are measured."""

    def __init__(self, path: Path) -> None:
        self.path, self.seconds = path, {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 1)
        self.path.write_text(json.dumps(self.seconds, indent=1))

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.seconds.items())


def cache_stage(config: str, out: Path, data: Path, overrides: tuple[str, ...]) -> tuple[str, ...]:
    """The frozen vision tower's features of one stage's images, once; the overrides that train from them."""
    from mmalign.config import load_config
    from mmalign.train.feature_cache import cache_features

    folder = out / f"features-{Path(config).stem}"
    shutil.rmtree(folder, ignore_errors=True)  # the data was just written: cache what is there now
    cache_features(load_config(CONFIGS / config, [f"data.path={data}", *overrides]), folder)
    return (f"data.features={folder}",)


def train_stage(config: str, output_dir: Path, data: Path, overrides: tuple[str, ...]) -> tuple[Any, Path]:
    """One stage of `configs/`, on the toy data; returns the config it ran and its last checkpoint."""
    from mmalign.config import load_config, with_recipe_defaults
    from mmalign.train.stage import train

    cfg = with_recipe_defaults(
        load_config(CONFIGS / config, [f"data.path={data}", f"train.output_dir={output_dir}", *overrides])
    )
    return cfg, train(cfg)


def export_and_evaluate(cfg: Any, checkpoint: Path, folder: Path, eval_dir: Path, n_scenes: int) -> dict:
    """Export a stage as users get it, and evaluate what was exported (the folder, reloaded)."""
    from mmalign.evaluate.toy import evaluate_toy
    from mmalign.model import LoadedModel
    from mmalign.train.export import export_checkpoint

    export_checkpoint(cfg, checkpoint, folder)
    result = evaluate_toy(LoadedModel.load(folder), n_scenes=n_scenes)
    result.save(eval_dir)
    return result.metrics


def sample_chat(folder: Path) -> None:
    """A sample chat answer about a held-out scene, as a user would get it."""
    from mmalign.chat.session import ChatSession
    from mmalign.model import LoadedModel
    from mmalign.prompts import MINIGPT4_INSTRUCTIONS

    session = ChatSession(LoadedModel.load(folder))
    scene = tw.make_scene(tw.split_seeds("test", 1).start)
    session.set_image(tw.render(scene))
    print(f"\nSample chat (held-out scene: {tw.listing(scene)})")
    for q in (MINIGPT4_INSTRUCTIONS[0], "How many objects are there?"):
        print(f"User: {q}\nAssistant: {''.join(session.ask(q))}")
