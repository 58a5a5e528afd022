"""The toy LLM's forward + backward (what a projector-only step spends most of its time on) in
float32 with sdpa attention (the old path) against bf16 autocast with sdpa, with eager
attention, and with eager attention and the decoder layers compiled (`train.compile`).

The shape is a packed stage-1 batch of the main job: 32 rows of 64 tokens, positions restarting
at a sample boundary inside each row (two samples per row), the frozen LLM on the gradient path
to the input embeddings. The compiled model's first call (the compile, from an empty compile
cache) is timed apart; every variant is warmed up once, then the variants run interleaved.

    PYTHONPATH=. python -m bench.llm_step [--quick]
"""

from __future__ import annotations

import contextlib
import time

import torch
from transformers import AutoModelForCausalLM

from bench.common import Row, empty_compile_cache, interleaved, section_main
from mmalign.recipes import TOY_ASSETS
from mmalign.train.trainable import compile_layers

ROWS, TOKENS = 32, 64


def _llm(attention: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(TOY_ASSETS / "llm"), attn_implementation=attention)
    model.requires_grad_(False)
    return model


def _step(model: torch.nn.Module, bf16: bool, batch: dict) -> None:
    embeds = batch["embeds"].clone().requires_grad_(True)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with cast:
        loss = model(
            inputs_embeds=embeds, labels=batch["labels"], position_ids=batch["positions"], use_cache=False
        ).loss
    loss.backward()


def rows(quick: bool = False) -> list[Row]:
    torch.manual_seed(0)
    sdpa, eager, compiled = _llm("sdpa"), _llm("eager"), _llm("eager")
    width, vocab = sdpa.config.hidden_size, sdpa.config.vocab_size
    half = TOKENS // 2
    batch = {
        "embeds": torch.randn(ROWS, TOKENS, width),
        "labels": torch.randint(0, vocab, (ROWS, TOKENS)),
        "positions": torch.cat([torch.arange(half), torch.arange(TOKENS - half)]).repeat(ROWS, 1),
    }
    with empty_compile_cache():
        torch._dynamo.reset()  # in `python -m bench` an earlier section compiled the same layer class
        compile_layers(compiled.model)
        started = time.perf_counter()
        _step(compiled, True, batch)
        compile_s = time.perf_counter() - started
    pieces = {
        "float32, sdpa": lambda: _step(sdpa, False, batch),
        "bf16, sdpa": lambda: _step(sdpa, True, batch),
        "bf16, eager": lambda: _step(eager, True, batch),
        "bf16, eager, compiled": lambda: _step(compiled, True, batch),
    }
    per = 3 if quick else 10
    timings = interleaved({name: (lambda fn=fn: [fn() for _ in range(per)]) for name, fn in pieces.items()}, 3, per)
    base = timings.pop("float32, sdpa")
    out = []
    for name, timing in timings.items():
        row = Row(f"toy LLM fwd + bwd, {name}", "float32, sdpa", base, timing, "s/step")
        row.note = f"{ROWS} packed rows x {TOKENS} tokens, LLM frozen, gradient to the input embeddings"
        if "compiled" in name:
            row.note += f"; first call (compiles the layers, empty cache) {compile_s:.0f} s, not in the figure"
        out.append(row)
    return out


def main() -> None:
    section_main(__doc__, rows)


if __name__ == "__main__":
    main()
