"""The main job on the embedded default: the MiniGPT-4 method, end to end, on the toy world,
as the paper did it.

1. write toy data to disk in the published layouts (a caption JSON for stage 1, MiniGPT-4's
   `cc_sbu_align` layout of generator-written descriptions for the upper-bound stage 2);
2. stage 1: cache the frozen vision tower's features of its images once (`mmalign cache-features`),
   align the projection on short captions from them, packed into rows (`configs/toy_stage1.yaml`),
   export it;
3. the stage-1 model curates its own stage-2 set from the `curated` split's images: describe ->
   Continue -> fix (the toy fix LLM over HTTP) -> filter -> review (an oracle) -> export
   (`mmalign.toy.curate`, `configs/curate_toy.yaml`);
4. stage 2 on that set (`configs/toy_stage2.yaml`), and on the generator-written set (upper bound),
   each from a feature cache of its own images, written when its records exist (the curated set's
   after curation: a cache is tied to the records it was made from);
5. evaluate all three on the same held-out scenes and prompts; report (with the funnel and the
   time per phase, also kept in `timings.json`) and a sample chat answer from the self-curated
   stage-2 model.

``baseline=True`` (``mmalign toy run --baseline``) trains as mmalign did before the speed work:
every step decodes its images and runs the vision tower, batches are padded, in float32 with
sdpa attention and no compile (the benchmark times both, docs/performance.md).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmalign.data import toyworld as tw

CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"
STAGE1_PAIRS = 16000
STAGE2_PAIRS = 3500  # MiniGPT-4's curated set is ~3.5k detailed descriptions
# the path before the speed work: images every step, padded batches, float32, sdpa, no compile
BASELINE = (
    "data.features=null",
    "data.packing=false",
    "data.num_workers=0",
    "train.mixed_precision=no",
    "train.compile=false",
    "model.attn_implementation=null",
)


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


CURATED_IMAGES = 1500  # MiniGPT-4 described 5,000 and kept ~3,500; the toy's stage-1 model keeps fewer (docs/curate.md)


def curated_steps(n_records: int) -> int:
    """Stage-2 steps on the self-curated set: as many passes over its records as the upper bound
    makes over its 3,500 (toy_stage2.yaml: 1,000 steps of 24, ~6.9 epochs). A fixed step count
    on a few hundred records would show each one ~40 times and teach the model to recite them."""
    from mmalign.config import load_config

    train = load_config(CONFIGS / "toy_stage2.yaml").train
    epochs = train.max_steps * train.batch_size / STAGE2_PAIRS
    return max(train.warmup_steps * 2, round(epochs * n_records / train.batch_size))


STAGES = {  # report column -> what stage 2 trained on
    "stage1": "stage 1 only (captions)",
    "stage2": "stage 2 on the self-curated set (the method)",
    "stage2-generator": "stage 2 on generator-written descriptions (upper bound)",
}


class Phases:
    """Wall time per phase of the main job, printed as it goes and kept for the report."""

    def __init__(self, path: Path | None = None) -> None:
        self.start = self.last = time.time()
        self.times: dict[str, float] = {}
        self.path = path  # where the seconds per phase are kept as they are measured (timings.json)

    def done(self, name: str) -> None:
        now = time.time()
        self.times[name] = now - self.last
        self.last = now
        if self.path is not None:
            self.path.write_text(json.dumps({k: round(v, 1) for k, v in self.times.items()}, indent=1))
        print(f"[phase] {name}: {self.times[name] / 60:.2f} min (total {(now - self.start) / 60:.2f} min)", flush=True)

    @property
    def minutes(self) -> float:
        return (time.time() - self.start) / 60

    def table(self) -> list[str]:
        rows = [f"| {name} | {sec / 60:.2f} |" for name, sec in self.times.items()]
        return ["| phase | minutes |", "|---|---|", *rows, f"| **total** | **{self.minutes:.2f}** |"]


def main_job(out: Path, quick: bool = False, overrides: tuple[str, ...] = (), baseline: bool = False) -> dict:
    """Data -> stage 1 -> the stage-1 model curates its own stage-2 set -> stage 2 on it (and, as
    the upper bound, on generator-written descriptions) -> all three evaluated -> report. Each
    training phase first caches its records' features (``baseline``: trains from images)."""
    from mmalign.evaluate.report import write_toy_report
    from mmalign.toy.curate import curate_toy

    phases = Phases(out / "timings.json")
    out.mkdir(parents=True, exist_ok=True)
    data = write_toy_data(out / "data", *((512, 256) if quick else ()))
    phases.done("toy data")
    # quick: a smoke run of the plumbing, 4 steps a run: compiling them would be most of its time
    steps = ("train.max_steps=4", "train.save_every=2", "train.compile=false") if quick else ()
    speed = SpeedPath(out, overrides, baseline)
    cfg1, ckpt1 = train_stage(
        "toy_stage1.yaml", out / "stage1", data["stage1"], (*steps, *speed("stage1", data["stage1"]))
    )
    export_stage(cfg1, ckpt1, out / "model-stage1")
    phases.done(f"stage 1 ({speed.what}train + export)")
    export_dir, funnel = curate_toy(out / "curate", out / "model-stage1", 48 if quick else CURATED_IMAGES, quick)
    phases.done("curation (describe, fix over HTTP, filter, review, export)")
    init = (f"model.init_trainable={ckpt1}", *steps)
    curated = export_dir / "cc_sbu_align" / "filter_cap.json"
    trained = {"stage1": (cfg1, ckpt1)}
    fewer = () if quick else (f"train.max_steps={curated_steps(funnel['kept'])}",)
    trained["stage2"] = train_stage(
        "toy_stage2.yaml", out / "stage2", curated, (*init, *fewer, *speed("stage2", curated))
    )
    phases.done(f"stage 2 on the self-curated set ({speed.what}train)")
    trained["stage2-generator"] = train_stage(
        "toy_stage2.yaml", out / "stage2-generator", data["stage2"], (*init, *speed("stage2-generator", data["stage2"]))
    )
    phases.done(f"stage 2 on generator-written descriptions ({speed.what}train)")
    n_scenes = 16 if quick else 200
    results = {}
    for stage, (cfg, ckpt) in trained.items():
        folder = out / f"model-{stage}"
        if stage != "stage1":
            export_stage(cfg, ckpt, folder)
        results[stage] = evaluate_stage(folder, out / f"eval-{stage}", n_scenes)
        phases.done(f"evaluate {stage} ({n_scenes} scenes)")
    notes = report_notes(results, funnel, phases, quick)
    print(write_toy_report(results, out, minutes=phases.minutes, notes=notes))
    sample_chat(out / "model-stage2")
    print(f"\nmain job finished in {phases.minutes:.1f} min; model: {out / 'model-stage2'}")
    return results


STAGE_CONFIGS = {"stage1": "toy_stage1.yaml", "stage2": "toy_stage2.yaml", "stage2-generator": "toy_stage2.yaml"}


class SpeedPath:
    """How the main job trains: from a feature cache of each run's records, written just before
    the run (so the self-curated set's cache is made from the curation's export), or, as the
    baseline, from images every step (``BASELINE``). User overrides come last and win."""

    def __init__(self, out: Path, overrides: tuple[str, ...], baseline: bool) -> None:
        self.out, self.overrides, self.baseline = out, overrides, baseline
        self.what = "" if baseline else "cache features, "

    def __call__(self, run: str, records: Path) -> tuple[str, ...]:
        """The overrides of one training run (``run``: a key of ``STAGE_CONFIGS``) on ``records``."""
        if self.baseline:
            return (*BASELINE, *self.overrides)
        from mmalign.config import load_config
        from mmalign.train.feature_cache import cache_features

        folder = self.out / f"features-{run}"
        shutil.rmtree(folder, ignore_errors=True)  # the records were just written: cache what is there now
        cache_features(load_config(CONFIGS / STAGE_CONFIGS[run], [f"data.path={records}", *self.overrides]), folder)
        return (f"data.features={folder}", *self.overrides)


def train_stage(config: str, output_dir: Path, data: Path, overrides: tuple[str, ...]) -> tuple[Any, Path]:
    """One stage of `configs/`, on the toy data; returns the config it ran and its last checkpoint."""
    from mmalign.config import load_config, with_recipe_defaults
    from mmalign.train.stage import train

    cfg = with_recipe_defaults(
        load_config(CONFIGS / config, [f"data.path={data}", f"train.output_dir={output_dir}", *overrides])
    )
    return cfg, train(cfg)


def export_stage(cfg: Any, checkpoint: Path, folder: Path) -> Path:
    """A stage as users get it: a full HF folder."""
    from mmalign.train.export import export_checkpoint

    return export_checkpoint(cfg, checkpoint, folder)


def evaluate_stage(folder: Path, eval_dir: Path, n_scenes: int) -> dict:
    """Evaluate what was exported (the folder, reloaded) on the held-out test scenes."""
    from mmalign.evaluate.toy import evaluate_toy
    from mmalign.model import LoadedModel

    result = evaluate_toy(LoadedModel.load(folder), n_scenes=n_scenes)
    result.save(eval_dir)
    return result.metrics


def report_notes(results: dict, funnel: dict, phases: Phases, quick: bool) -> list[str]:
    """What the table says about the method, the funnel of the self-curated set, the phases."""
    from mmalign.curate.export import funnel_table

    get = lambda stage, field: results[stage]["describe_long"][field]  # noqa: E731
    lines = ["Columns: " + "; ".join(f"`{k}` = {v}" for k, v in STAGES.items()) + ".", ""]
    lines += ["Stage 1 -> stage 2 on its own curated set, detailed prompt (lower is better but for recall):", ""]
    for field, what in (
        ("chair_i", "CHAIRi"),
        ("object_recall", "object recall"),
        ("repeated_trigram_rate", "repeated-trigram rate"),
        ("repeated_sentence_rate", "repeated-sentence rate"),
        ("unfinished_rate", "unfinished rate"),
        ("malformed_sentence_rate", "malformed-sentence rate"),
    ):
        a, b, c = get("stage1", field), get("stage2", field), get("stage2-generator", field)
        better = (b > a) if field == "object_recall" else (b < a)
        verdict = "better" if better else ("same" if a == b else "worse")
        lines.append(f"- {what}: {a:.1%} -> {b:.1%} ({verdict}); upper bound {c:.1%}")
    lines += ["", "## The self-curated stage-2 set", ""]
    lines += [
        "The stage-1 model described the `curated` split's scenes, the toy fix LLM (served by `mmalign serve`, "
        "called over HTTP) repaired them, rules filtered them, and an **oracle stood in for the paper's person**: "
        "it checks every sentence against the scene's exact objects (colour and shape, one object per sentence; "
        "count; relations), accepts a description whose sentences all fit and that names every object, edits one "
        "by deleting the sentences that do not fit, rejects the rest (mmalign/toy/curate.py)."
        + (" Quick run: the review accepted everything that passed the filters." if quick else ""),
        "",
        funnel_table(funnel),
        "",
        "## Time per phase",
        "",
        *phases.table(),
    ]
    return lines


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
