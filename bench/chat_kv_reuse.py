"""Turn latency of a 10-turn chat about one image, with the KV cache reused between turns
(turn N encodes only its new user message) and without (the baseline re-encodes the image and
the whole conversation every turn), on the toy model (`toy-minigpt4`: shipped toy backbones,
untrained projector), CPU.

Every turn generates exactly `--new-tokens` tokens (the stop string is replaced by one that
never occurs), so turns differ only in how much context there is. Per turn the median over
`--repeats` conversations is taken; the target is turn 10 <= 1.2 x turn 1 with reuse.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/chat_kv_reuse.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmalign.chat.session import ChatSession
from mmalign.data import toyworld
from mmalign.model import build_model, image_transform_for
from mmalign.recipes import get_recipe

QUESTIONS = ["Describe this image in detail.", "How many shapes are there?", "What color is the circle?",
             "Is there a square in the image?", "What is at the top left?"]  # fmt: skip


def conversation(model, tok, kv_reuse: bool, turns: int, new_tokens: int) -> tuple[list[float], int]:
    session = ChatSession(model, tok, "minigpt4_v0", image_transform_for(model), system=None, kv_reuse=kv_reuse,
                          max_context=model.config.text_config.max_position_embeddings)  # fmt: skip
    session.set_image(toyworld.render(toyworld.make_scene(7)))
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, stop_strings=["<never said>"])
    times = []
    for i in range(turns):
        t0 = time.perf_counter()
        for _ in session.ask(QUESTIONS[i % len(QUESTIONS)], **gen):
            pass
        times.append(time.perf_counter() - t0)
    return times, len(session.ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    model, tok = build_model(get_recipe("toy-minigpt4").spec)
    conversation(model, tok, True, 2, 2)  # warm-up
    runs: dict[bool, list[list[float]]] = {True: [], False: []}
    for _ in range(a.repeats):  # interleaved, so machine load hits both alike
        for reuse in (True, False):
            times, n_ids = conversation(model, tok, reuse, a.turns, a.new_tokens)
            runs[reuse].append(times)
    print(f"toy-minigpt4, CPU, {torch.get_num_threads()} thread(s); {a.turns} turns x {a.new_tokens} new tokens; "
          f"final context {n_ids} tokens; median of {a.repeats} conversations\n")  # fmt: skip
    print("| mode | turn 1 (ms) | turn 10 (ms) | turn 10 / turn 1 |")
    print("|---|---|---|---|")
    ratios = {}
    for reuse, name in ((True, "KV cache reused"), (False, "re-encode everything (baseline)")):
        per_turn = [statistics.median(r[i] for r in runs[reuse]) for i in range(a.turns)]
        ratios[reuse] = per_turn[-1] / per_turn[0]
        print(f"| {name} | {per_turn[0] * 1e3:.1f} | {per_turn[-1] * 1e3:.1f} | {ratios[reuse]:.2f} |")
    print(f"\ntarget turn {a.turns} <= 1.2 x turn 1 with reuse: {'MET' if ratios[True] <= 1.2 else 'NOT MET'} "
          f"({ratios[True]:.2f}; baseline {ratios[False]:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
