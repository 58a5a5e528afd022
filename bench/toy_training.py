"""Toy training, today's path vs the fast one, for the same steps and batch sizes, in one run.

Both stages of the main job (`configs/toy_stage1.yaml`, `configs/toy_stage2.yaml`, their batch
sizes) train `--steps` steps each on toy-world data, alternately:

- baseline (`mmalign toy run --baseline`): every step decodes its JPEGs, transforms them and runs
  the vision tower; batches padded to their longest sample; the loader in the main process;
- fast (`mmalign toy run`): the stage's features cached once by `mmalign cache-features` (its
  cost is in the note), the configs' speed settings (packed rows, a loader worker).

Timed: the stage's step loop (wall and CPU seconds per step); the losses of both paths are
printed side by side for the first steps (same batches, so they agree to float tolerance).

    PYTHONPATH=. python -m bench.toy_training [--steps 40] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import Row, Timing, machine, table, timed
from mmalign.config import load_config, with_recipe_defaults
from mmalign.toy.run import BASELINE, CONFIGS, STAGE_CONFIGS, write_toy_data
from mmalign.train.feature_cache import cache_features
from mmalign.train.stage import StageRun


class LoopTimed(StageRun):
    """A stage run that times its step loop and keeps its losses."""

    def train_steps(self) -> None:
        self.loop = Timing()
        timed(super().train_steps, self.loop, per=self.train_cfg.max_steps)


def run_stage(config: str, data: Path, out: Path, overrides: tuple[str, ...]) -> tuple[Timing, list[float]]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(CONFIGS / config, [f"data.path={data}", f"train.output_dir={out}", *overrides])
    run = LoopTimed(with_recipe_defaults(cfg))
    run.run()
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return run.loop, losses


def measure(root: Path, steps: int, repeats: int) -> list[Row]:
    data = write_toy_data(root / "data", 2048, 512)
    common = (f"train.max_steps={steps}", "train.log_every=1", "train.save_every=100000", "train.plot=false")
    rows = []
    for stage, config in list(STAGE_CONFIGS.items())[:2]:
        started = time.perf_counter()
        cache = cache_features(load_config(CONFIGS / config, [f"data.path={data[stage]}"]), root / f"cache-{stage}")
        cache_s = time.perf_counter() - started
        variants = {"baseline": BASELINE, "fast": (f"data.features={cache.folder}",)}
        timings = {name: Timing() for name in variants}
        losses = {}
        for _ in range(repeats):
            for name, extra in variants.items():
                loop, losses[name] = run_stage(config, data[stage], root / f"run-{name}", (*common, *extra))
                for field in ("wall", "cpu"):
                    getattr(timings[name], field).extend(getattr(loop, field))
                timings[name].peak_bytes = max(timings[name].peak_bytes, loop.peak_bytes)
        worst = max(abs(a - b) for a, b in zip(losses["baseline"], losses["fast"]))
        images = json.loads((cache.folder / "cache.json").read_text())["written"]["images"]
        row = Row(f"toy training, {stage}", "images every step, padded", timings["baseline"], timings["fast"], "s/step")
        row.note = (
            f"{config}, {steps} steps; the cache took {cache_s:.0f} s for {images} images; losses agree to {worst:.1e}"
        )
        rows.append(row)
    return rows


def rows(quick: bool = False, steps: int | None = None) -> list[Row]:
    logging.getLogger("mmalign").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        return measure(Path(tmp), steps or (15 if quick else 40), 1 if quick else 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    print(machine())
    print(table(rows(a.quick, a.steps)))


if __name__ == "__main__":
    main()
