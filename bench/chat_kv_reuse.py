"""Turn latency of a 10-turn chat about one image, with the KV cache reused between turns
(turn N encodes only its new user message) and without (the baseline re-encodes the image and
the whole conversation every turn), on the toy model (`toy-minigpt4`: shipped toy backbones,
untrained projector), CPU.

Every turn generates exactly `--new-tokens` tokens and keeps them all in the conversation (the
template's stop string is replaced by one that never occurs), so turns differ only in how much
context there is: ~360 tokens by turn 10 with MiniGPT-4's system message. Each turn is timed
as process CPU time (all threads; what the turn costs, robust to other processes on a shared
machine) and as wall-clock time; per turn the best (minimum) of `--repeats` conversations is
taken, the two modes interleaved. The target is turn 10 <= 1.2 x turn 1 with reuse (CPU time).

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/chat_kv_reuse.py
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bench.common import Row, Timing, measure_peak, verdict
from mmalign.chat.session import ChatSession
from mmalign.data import toyworld
from mmalign.model import LoadedModel, build_model
from mmalign.prompts import get_template
from mmalign.recipes import get_recipe

NO_STOP = dataclasses.replace(get_template("minigpt4_v0"), stop=("<never said>",))

QUESTIONS = [
    "Describe this image in detail.",
    "How many shapes are there?",
    "What color is the circle?",
    "Is there a square in the image?",
    "What is at the top left?",
]


def conversation(model, tok, kv_reuse: bool, turns: int, new_tokens: int) -> tuple[list[tuple[float, float]], int]:
    session = ChatSession(
        LoadedModel.of(model, tok, NO_STOP),
        kv_reuse=kv_reuse,
        max_context=model.config.text_config.max_position_embeddings,
    )
    session.set_image(toyworld.render(toyworld.make_scene(7)))
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    times = []
    for i in range(turns):
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in session.ask(QUESTIONS[i % len(QUESTIONS)], **gen):
            pass
        times.append((time.process_time() - c0, time.perf_counter() - w0))
    return times, len(session.ids)


def rows(quick: bool = False, turns: int = 10, new_tokens: int = 16) -> list[Row]:
    """One row: turn 10 re-encoding everything (baseline) vs turn 10 on the reused KV cache; the
    note holds turn 10 / turn 1 of both modes (target <= 1.2 with reuse, CPU time)."""
    torch.manual_seed(0)
    model, tok = build_model(get_recipe("toy-minigpt4").spec)
    conversation(model, tok, True, 2, 2)  # warm-up
    last = {True: Timing(), False: Timing()}  # turn `turns` of each conversation
    first: dict[bool, list[float]] = {True: [], False: []}  # turn 1, CPU seconds
    for _ in range(3 if quick else 7):  # interleaved, so machine load hits both alike
        for reuse in (False, True):
            times, n_ids = conversation(model, tok, reuse, turns, new_tokens)
            last[reuse].cpu.append(times[-1][0])
            last[reuse].wall.append(times[-1][1])
            first[reuse].append(times[0][0])
    for reuse in (False, True):  # peak memory in a conversation of its own (see bench.common)
        measure_peak(lambda reuse=reuse: conversation(model, tok, reuse, turns, new_tokens), last[reuse])
    growth = {reuse: min(last[reuse].cpu) / min(first[reuse]) for reuse in (True, False)}
    row = Row(f"chat turn {turns}, KV cache reused", "re-encode image + conversation", last[False], last[True])
    row.unit = "s/turn"
    row.note = (
        f"toy-minigpt4, {new_tokens} new tokens a turn, {n_ids} tokens of context by turn {turns}; turn {turns} / "
        f"turn 1 (best CPU): reused {growth[True]:.2f}, re-encoded {growth[False]:.2f}"
    )
    row.target = f"turn {turns} <= 1.2 x turn 1 with reuse (CPU): {growth[True]:.2f}, {verdict(growth[True] <= 1.2)}"
    return [row]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    torch.manual_seed(0)
    model, tok = build_model(get_recipe("toy-minigpt4").spec)
    conversation(model, tok, True, 2, 2)  # warm-up
    runs: dict[bool, list] = {True: [], False: []}
    for _ in range(a.repeats):  # interleaved, so machine load hits both alike
        for reuse in (True, False):
            times, n_ids = conversation(model, tok, reuse, a.turns, a.new_tokens)
            runs[reuse].append(times)
    print(
        f"toy-minigpt4, CPU, {torch.get_num_threads()} thread(s); {a.turns} turns x {a.new_tokens} new tokens; "
        f"final context {n_ids} tokens; best of {a.repeats} conversations\n"
    )
    print(
        f"| mode | turn 1 CPU ms | turn {a.turns} CPU ms | ratio (CPU) | turn 1 wall ms | turn {a.turns} wall ms "
        "| ratio (wall) |"
    )
    print("|---|---|---|---|---|---|---|")
    ratio = {}
    for reuse, name in ((True, "KV cache reused"), (False, "re-encode everything (baseline)")):
        best = [[min(r[i][k] for r in runs[reuse]) for i in range(a.turns)] for k in (0, 1)]  # [cpu|wall][turn]
        ratio[reuse] = best[0][-1] / best[0][0]
        print(
            f"| {name} | {best[0][0] * 1e3:.1f} | {best[0][-1] * 1e3:.1f} | {ratio[reuse]:.2f} | "
            f"{best[1][0] * 1e3:.1f} | {best[1][-1] * 1e3:.1f} | {best[1][-1] / best[1][0]:.2f} |"
        )
    print(
        f"\ntarget turn {a.turns} <= 1.2 x turn 1 with reuse (CPU time): "
        f"{'MET' if ratio[True] <= 1.2 else 'NOT MET'} ({ratio[True]:.2f}; baseline {ratio[False]:.2f})"
    )


if __name__ == "__main__":
    main()
