"""Toy training, today's path vs the fast one, doing the same work, in one run.

Both stages of the main job (`configs/toy_stage1.yaml`, `configs/toy_stage2.yaml`, their batch
sizes) train `--steps` steps each on toy-world data, the two paths alternately:

- baseline (`mmalign toy run --baseline`): every step decodes its JPEGs, transforms them and runs
  the vision tower; batches padded to their longest sample; float32, sdpa attention, no compile;
- fast (`mmalign toy run`): the run's features cached first by `mmalign cache-features`, then
  the step loop reads them; bf16 autocast with eager attention and the LLM compiled
  (`train.compile`); stage 1 packs its short captions into rows (`data.packing: true` in its
  config); stage 2 does not (its descriptions are of similar lengths: packing saves nothing).

Same work: each stage makes about as many passes over its images as in the main job (stage 1:
16,000 images for 2,500 steps of 64, 10 epochs; stage 2 on generator descriptions: 3,500 images
for 1,000 steps of 24, ~7 epochs), in whole batches (every step as large as there). The stage rows
spread the fast path's cache over their steps (the note says its share); the main job's row
charges the cache as the main job pays it: its fixed cost (timed apart, on one image) once per
run, the rest per image cached there. The first step of each run is timed apart (under
`train.compile` it compiles the LLM: a cost per run, not per step) and added once per run to the
main job's row. Both paths log every step and save once at the end (the main job: every 10 and
500 steps): the same seconds on both sides. The losses of both paths are compared step by step
(same batches: they agree to bf16 tolerance).

    PYTHONPATH=. python -m bench.toy_training [--steps 60] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bench.common import Row, Timing, empty_compile_cache, machine, measure_peak, table, verdict
from mmalign.config import load_config, with_recipe_defaults
from mmalign.toy.run import CONFIGS, STAGE_CONFIGS, SpeedPath, write_toy_data
from mmalign.train.stage import StageRun

EPOCHS = {"stage1": 10, "stage2": 7}  # passes over the images in the main job (see the docstring)
COMMON = ("train.log_every=1", "train.save_every=100000", "train.plot=false")
MEMORY_STEPS = 10  # a run for peak memory: past the first step (optimizer state, the compile), a few more


class LoopTimed(StageRun):
    """A stage run that times its step loop (wall and CPU seconds), the first step apart: under
    ``train.compile`` that step compiles the LLM, a cost paid once per run, not per step."""

    def train_steps(self) -> None:
        self.marks: list[tuple[float, float]] = []
        wall, cpu = time.perf_counter(), time.process_time()
        super().train_steps()
        self.loop = (time.perf_counter() - wall, time.process_time() - cpu)
        self.first = (self.marks[1][0] - wall, self.marks[1][1] - cpu)  # up to the second batch

    def on_batch(self, batch: dict) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))


@dataclass
class PathRun:
    """One path of one stage: the step loop's wall / CPU seconds per step after the first step,
    the first step's extra seconds, the cache's seconds (the fast path's: all of it, and the
    fixed part, timed on one image) and images, the losses."""

    step_wall: float
    step_cpu: float
    first_extra: float
    first_extra_cpu: float
    losses: list[float]
    cache_wall: float
    cache_cpu: float
    cache_fixed_wall: float
    cache_fixed_cpu: float
    steps: int
    images: int

    @property
    def wall(self) -> float:
        """Seconds per step with the cache spread over the steps (the stage rows)."""
        return self.step_wall + self.cache_wall / self.steps

    @property
    def cpu(self) -> float:
        return self.step_cpu + self.cache_cpu / self.steps

    def seconds(self, field: str, steps: int, runs: int, images: int) -> float:
        """``steps`` steps in ``runs`` runs caching ``images`` images, "wall" or "cpu" seconds,
        first steps apart (``first_step``): the cache's fixed cost once per run, the rest per image."""
        step, cache, fixed = (
            (self.step_wall, self.cache_wall, self.cache_fixed_wall)
            if field == "wall"
            else (self.step_cpu, self.cache_cpu, self.cache_fixed_cpu)
        )
        return step * steps + fixed * runs + max(cache - fixed, 0.0) / self.images * images

    def first_step(self, field: str) -> float:
        return self.first_extra if field == "wall" else self.first_extra_cpu


def clocked(fn: Any, *args: Any) -> tuple[Any, float, float]:
    """``fn(*args)``, its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run_stage(stage: str, data: Path, one: Path, root: Path, steps: int, baseline: bool, images: int) -> PathRun:
    """One run of ``steps`` steps on ``data`` (``images`` images); the fast path caches ``data``
    first, and ``one`` (a one-image set) apart: the cache's fixed cost."""
    out = root / ("run-baseline" if baseline else "run-fast")
    shutil.rmtree(out, ignore_errors=True)
    speed, cache_wall, cache_cpu = clocked(SpeedPath(root, (), baseline), stage, data)  # fast: root / features-STAGE
    _, fixed_wall, fixed_cpu = clocked(SpeedPath(root / "one", (), baseline), stage, one)
    overrides = [f"data.path={data}", f"train.output_dir={out}", f"train.max_steps={steps}", *COMMON, *speed]
    run = LoopTimed(with_recipe_defaults(load_config(CONFIGS / STAGE_CONFIGS[stage], overrides)))
    torch._dynamo.reset()  # each run compiles as a new process would (from the on-disk cache once warm)
    run.run()
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    rest = steps - 1
    step_wall, step_cpu = (run.loop[0] - run.first[0]) / rest, (run.loop[1] - run.first[1]) / rest
    first = (run.first[0] - step_wall, run.first[1] - step_cpu)
    return PathRun(step_wall, step_cpu, *first, losses, cache_wall, cache_cpu, fixed_wall, fixed_cpu, steps, images)


def images_for(batch: int, steps: int, epochs: int) -> int:
    """About the main job's passes over its images (``epochs``) in ``steps`` steps, in whole
    batches: an epoch's incomplete last batch (96 images at 64 a step: one of 32 every other
    step) made the bench's steps cheaper than the main job's (16,000 = 250 x 64; stage 2's
    3,500 = 145 x 24 + 20: one short batch in 146)."""
    return batch * max(1, round(steps / epochs))


def measure_stage(stage: str, root: Path, steps: int, repeats: int) -> Row:
    batch = load_config(CONFIGS / STAGE_CONFIGS[stage]).train.batch_size
    images = images_for(batch, steps, EPOCHS[stage])
    data = write_toy_data(root / "data", images, images)[stage]
    one = write_toy_data(root / "data-one", 1, 1)[stage]
    timings = {True: Timing(), False: Timing()}
    runs: dict[bool, list[PathRun]] = {True: [], False: []}
    for _ in range(repeats):
        for baseline in (True, False):
            result = run_stage(stage, data, one, root, steps, baseline, images)
            runs[baseline].append(result)
            timings[baseline].wall.append(result.wall)
            timings[baseline].cpu.append(result.cpu)
    for baseline in (True, False):  # peak memory in a shorter run of its own (see bench.common)
        run = partial(run_stage, stage, data, one, root, min(steps, MEMORY_STEPS), baseline, images)
        measure_peak(run, timings[baseline])
    worst = max(abs(a - b) for a, b in zip(runs[True][-1].losses, runs[False][-1].losses))
    row = Row(f"toy training, {stage}", "images every step, padded", timings[True], timings[False], "s/step")
    fast = runs[False]
    cache_share = min(r.cache_wall for r in fast) / steps / timings[False].best
    row.extra = {"stage": stage, "runs": runs}
    row.note = (
        f"{STAGE_CONFIGS[stage]}: {steps} steps of {batch} on {images} images ({steps * batch / images:.1f} epochs; "
        f"the main job: ~{EPOCHS[stage]}), after the first step; fast includes writing the cache "
        f"({cache_share:.0%} of its time; its fixed cost {min(r.cache_fixed_wall for r in fast):.2f} s); "
        f"first step's extra: baseline {runs[True][0].first_extra:.1f} s, fast {fast[0].first_extra:.1f} s "
        f"(compiles the LLM; later repeats reuse the on-disk compile cache: {min(r.first_extra for r in fast):.1f} s); "
        f"losses agree to {worst:.1e} (bf16 against float32)"
    )
    row.target = f"toy training >= 2x faster: {row.ratio:.2f}x, {verdict(row.ratio >= 2)}"
    return row


class MainJobStage(NamedTuple):
    steps: int
    runs: int
    images: int  # cached, over its runs


# stage 1 on 16,000 images; stage 2 ~100 steps on the self-curated set (~300-450 records, one run)
# + 1,000 on the generator's 3,500 (another run)
MAIN_JOB = {"stage1": MainJobStage(2500, 1, 16000), "stage2": MainJobStage(1100, 2, 3900)}


def main_job_row(stage_rows: list[Row]) -> Row:
    """Both stages as in the main job: the training part of `mmalign toy run`. Repeat by repeat:
    each stage's steps at the repeat's step time, its caches as the main job pays them
    (``PathRun.seconds``), and the first steps: the first run's at the first repeat's figure
    (the cold compile), the later runs' at the last repeat's (warm, as the main job's later runs)."""
    base, fast = Timing(), Timing()
    for i in range(min(len(r.base.wall) for r in stage_rows)):
        for into, baseline in ((base, True), (fast, False)):
            for field in ("wall", "cpu"):
                total = 0.0
                for r in stage_rows:
                    job, runs = MAIN_JOB[r.extra["stage"]], r.extra["runs"][baseline]
                    total += runs[i].seconds(field, job.steps, job.runs, job.images)
                    total += runs[0].first_step(field) + runs[-1].first_step(field) * (job.runs - 1)
                getattr(into, field).append(total)
    base.peak_bytes = max(r.base.peak_bytes for r in stage_rows)
    fast.peak_bytes = max(r.fast.peak_bytes for r in stage_rows)
    row = Row("toy training in the main job (steps + caches)", "images every step, padded", base, fast, "s")
    row.note = "; ".join(
        f"{stage}: {job.steps:,} steps in {job.runs} run(s), caches of {job.images:,} images"
        for stage, job in MAIN_JOB.items()
    ) + (
        "; from the rows above, repeat by repeat (step times; each cache's fixed cost once per run, the rest per "
        "image), plus each run's first-step extra (the compile: cold for the first run, warm for later ones)"
    )
    row.target = f"toy training >= 2x faster: {row.ratio:.2f}x, {verdict(row.ratio >= 2)}"
    return row


def rows(quick: bool = False, steps: int | None = None) -> list[Row]:
    """Both stages, then the main job's row; the compile cache starts empty (the first compile
    is cold, as on a fresh machine) and is kept between runs, as on disk between main jobs."""
    logging.getLogger("mmalign").setLevel(logging.WARNING)
    out = []
    with empty_compile_cache():
        for stage in ("stage1", "stage2"):
            with tempfile.TemporaryDirectory() as tmp:
                out.append(measure_stage(stage, Path(tmp), steps or (15 if quick else 60), 3))
    return [*out, main_job_row(out)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (>= 2: the first is timed apart)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.steps is not None and a.steps < 2:
        p.error("--steps must be at least 2 (the first step is timed apart)")
    print(machine())
    print(table(rows(a.quick, a.steps)))


if __name__ == "__main__":
    main()
