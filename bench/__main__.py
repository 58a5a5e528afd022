"""`python -m bench`: each optimisation against its baseline, on the same model and data, in one
process and one run, printed as one table with ratios and peak memory (docs/performance.md).

Sections, in order (``--only`` picks some):

- ``feature_cache``: stage-1 step from cached features vs from JPEGs, with the ceiling (toy model
  and a random model with MiniGPT-4's proportions, widths / 16);
- ``packing``: stage-2 tokens/s, packed rows vs padded batches (LLaVA-665k-like mix; equal lengths);
- ``toy_training``: the main job's two stages, fast path vs ``mmalign toy run --baseline``;
- ``llm_step``: the toy LLM's forward + backward in bf16 (sdpa, eager, compiled) vs float32;
- ``chat``: turn 10 of a chat on the reused KV cache vs re-encoding everything;
- ``eval``: batched evaluation vs one prompt at a time;
- ``int8``: int8 weights vs float32, memory.

Nothing is downloaded: every model is the shipped toy or built at random here.

    PYTHONPATH=. python -m bench [--quick] [--only packing,chat]
"""

from __future__ import annotations

import argparse
import importlib
import time

from bench.common import Row, machine, table

SECTIONS = {  # name -> module whose rows(quick) measures it
    "feature_cache": "bench.feature_cache",
    "packing": "bench.packing",
    "toy_training": "bench.toy_training",
    "llm_step": "bench.llm_step",
    "chat": "bench.chat_kv_reuse",
    "eval": "bench.eval_batching",
    "int8": "bench.quantized_loading",
}


def measure(quick: bool, only: list[str] | None = None) -> tuple[list[Row], dict[str, float]]:
    """Every section's rows, and the seconds each section took."""
    rows, seconds = [], {}
    for name in only or list(SECTIONS):
        started = time.perf_counter()
        rows += importlib.import_module(SECTIONS[name]).rows(quick)
        seconds[name] = time.perf_counter() - started
        print(f"[bench] {name}: {seconds[name]:.0f} s", flush=True)
    return rows, seconds


def report(quick: bool, only: list[str] | None = None) -> str:
    """The machine, the table (with the targets) and the time per section, as printed."""
    rows, seconds = measure(quick, only)
    took = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    mode = "--quick" if quick else "full"
    return f"{machine()}\nmode: {mode}; sections: {took}\n\n{table(rows)}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller data and fewer repeats (a few minutes)")
    p.add_argument("--only", default=None, help=f"comma-separated sections of {', '.join(SECTIONS)}")
    a = p.parse_args(argv)
    only = a.only.split(",") if a.only else None
    unknown = sorted(set(only or []) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    print(report(a.quick, only))


if __name__ == "__main__":
    main()
