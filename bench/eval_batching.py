"""Batched evaluation vs one prompt at a time, on the toy model, in one run.

    OMP_NUM_THREADS=1 python bench/eval_batching.py [--model runs/toy/model-stage2] [--scenes 12] [--batch-size 64]

Without --model the toy recipe is composed from the shipped backbones (an untrained projection:
the same compute per token as a trained one). Both runs answer the same toy-suite prompts
(questions with 8 new tokens, long / short descriptions with 120) greedily through
`mmalign.evaluate.runner.run_task`; the script checks the predictions are identical and prints
both wall times and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial

import torch

from bench.common import Row, Timing, measure_peak, timed
from mmalign.evaluate.runner import run_task
from mmalign.evaluate.toy import TASK, toy_samples
from mmalign.model import LoadedModel


def load(model_dir: str | None) -> LoadedModel:
    if model_dir:
        return LoadedModel.load(model_dir)
    from mmalign.model import build_model
    from mmalign.recipes import get_recipe

    torch.manual_seed(0)
    recipe = get_recipe("toy-minigpt4")
    model, tok = build_model(recipe.spec)
    return LoadedModel.of(model, tok, "minigpt4_v0")


def rows(quick: bool = False, batch_size: int = 64) -> list[Row]:
    """One row: the toy suite's prompts answered one at a time vs ``batch_size`` at a time (the
    same greedy answers, checked), s per prompt."""
    loaded = load(None)
    samples = toy_samples(n_scenes=2 if quick else 8)
    with tempfile.TemporaryDirectory() as out:  # untimed warm-up: one-time costs land on neither side
        run_task(TASK, samples[:4], out, loaded, batch_size=2, progress=False)
    timings, preds = {1: Timing(), batch_size: Timing()}, {}
    for _ in range(1 if quick else 2):
        for bs in timings:
            with tempfile.TemporaryDirectory() as out:
                answer = partial(run_task, TASK, samples, out, loaded, batch_size=bs, progress=False)
                res = timed(answer, timings[bs], per=len(samples))
            preds[bs] = [r["prediction"] for r in res.records]
    for bs in timings:  # peak memory in a run of its own (see bench.common)
        with tempfile.TemporaryDirectory() as out:
            measure_peak(partial(run_task, TASK, samples, out, loaded, batch_size=bs, progress=False), timings[bs])
    if preds[1] != preds[batch_size]:
        raise SystemExit("batched predictions differ from batch size 1")
    row = Row(f"evaluation, batch {batch_size}", "one prompt at a time", timings[1], timings[batch_size], "s/prompt")
    row.note = f"toy suite, {len(samples)} prompts (questions: 8 new tokens, descriptions: 120); identical answers"
    return [row]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="exported toy model folder (default: toy recipe, untrained projection)"
    )
    p.add_argument("--scenes", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    loaded = load(a.model)
    samples = toy_samples(n_scenes=a.scenes)
    print(
        f"{len(samples)} prompts ({sum(s.max_new_tokens == 8 for s in samples)} questions, "
        f"{sum(s.max_new_tokens == 120 for s in samples)} descriptions), torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as out:  # untimed warm-up: one-time costs land on neither side
        run_task(TASK, samples[:4], out, loaded, batch_size=2, progress=False)
    times, preds = {}, {}
    for bs in (1, a.batch_size):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            res = run_task(TASK, samples, out, loaded, batch_size=bs, progress=False)
            times[bs] = time.perf_counter() - t0
        preds[bs] = [r["prediction"] for r in res.records]
        print(f"batch size {bs:3d}: {times[bs]:7.1f} s  ({len(samples) / times[bs]:.1f} prompts/s)")
    same = preds[1] == preds[a.batch_size]
    print(f"identical predictions: {same}")
    print(f"speed-up batched / batch 1: {times[1] / times[a.batch_size]:.1f}x")
    if not same:
        raise SystemExit("batched predictions differ from batch size 1")


if __name__ == "__main__":
    main()
