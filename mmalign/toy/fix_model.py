"""The toy fix LLM: a small text-only model that repairs toy descriptions, standing in for
ChatGPT in MiniGPT-4's curation. It never sees an image.

It is the toy LLM (same tokenizer and architecture) fine-tuned on pairs the toy world makes:
a clean description, and a corrupted copy of it with the failures a stage-1 model and its
"Continue" turn produce (sentences said again, a second description appended, a sentence cut
off, stray characters, a sentence with a word missing), asked with the paper's fix
instruction, verbatim, in the MiniGPT-4 template (with and without its system message, as
``mmalign serve`` and a local run send it). The target only ever deletes: the model must not
invent content it cannot see, so a broken or cut-off sentence is removed, not completed.
Clean paragraphs vary in what they say (objects left out, a count that disagrees): the repair
must copy what it is given, not correct the scene.

    python -m mmalign.toy.pretrain fix --minutes 15 --threads 1
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmalign.curate.config import FIX_INSTRUCTION
from mmalign.data import toyworld as tw

KINDS = ("clean", "repeat", "continue", "cut", "stray", "broken", "mixed")
STRAY = ("#", "##", "###", "</s>", "~", "*", "- -", ":", "ImageContent", "Assistant:", "\u00bf", "..", ", ,")
STRAY += tw.NUMBER_WORDS  # what the toy LLM answers to "Continue": "zero", "one"


def clean_paragraph(scene: tw.Scene, rng: random.Random) -> list[str]:
    """A description of ``scene`` as a stage-1 model might say it: all of it, or with object
    sentences left out (the count sentence then disagrees, and is copied as it is)."""
    parts = tw.sentences(tw.description(scene))
    if len(parts) > 2 and rng.random() < 0.4:
        keep = [parts[0]] + [p for p in parts[1:] if rng.random() < 0.7]
        parts = keep if len(keep) > 1 else parts[:2]
    return parts


def _cut(sentence: str, rng: random.Random) -> str:
    words = sentence.rstrip(".").split()
    return " ".join(words[: rng.randint(1, max(1, len(words) - 1))])


def _broken(sentence: str, rng: random.Random) -> str:
    words = sentence.rstrip(".").split()
    if len(words) < 4:
        return _cut(sentence, rng)
    del words[rng.randrange(2, len(words))]
    return " ".join(words) + "."


def corrupt(parts: list[str], kind: str, rng: random.Random, other: list[str]) -> tuple[str, str]:
    """(corrupted paragraph, the repaired target) for one ``kind`` of failure."""
    target = " ".join(parts)
    if kind == "clean":
        return target, target
    if kind == "mixed":
        text, _ = corrupt(parts, rng.choice(("repeat", "continue")), rng, other)
        return corrupt(tw.sentences(text), rng.choice(("cut", "stray")), rng, other)[0], target
    out = list(parts)
    if kind == "repeat":  # one or more sentences said again, next to it or later
        for _ in range(rng.randint(1, 3)):
            s = rng.choice(parts)
            out.insert(rng.randint(out.index(s) + 1, len(out)), s)
    elif kind == "continue":  # the answer to "Continue": the description (or part of it) again
        out += [s for s in parts if rng.random() < 0.8] or parts[:1]
    elif kind == "cut":  # the answer stopped mid-sentence
        out.append(_cut(rng.choice(other), rng))
    elif kind == "stray":
        if rng.random() < 0.5:  # the stage-1 toy model's usual "Continue" answer, after the text
            out.append(rng.choice(tw.NUMBER_WORDS[:3]))
        for _ in range(rng.randint(0 if len(out) > len(parts) else 1, 2)):
            out.insert(rng.randint(0, len(out)), rng.choice(STRAY))
    elif kind == "broken":  # a sentence with a word missing: removed, since its fact is unknown
        i = rng.randrange(len(out))
        broken = _broken(out[i], rng)
        if broken.rstrip(".") == out[i].rstrip("."):
            return target, target
        out[i] = broken
        target = " ".join(p for j, p in enumerate(parts) if j != i)
    return " ".join(out), target


def fix_pair(seed: int) -> tuple[str, str, str]:
    """(kind, corrupted, target) from one toy scene; the same seed gives the same pair."""
    rng = random.Random(seed)
    scene = tw.make_scene(seed)
    parts = clean_paragraph(scene, rng)
    other = tw.sentences(tw.description(tw.make_scene(seed + 1)))
    kind = rng.choices(KINDS, weights=(3, 2, 3, 3, 2, 2, 2))[0]
    text, target = corrupt(parts, kind, rng, other)
    return kind, text, target


def fix_turns(paragraph: str, target: str | None = None) -> list[dict[str, str]]:
    """The chat the fixer gets: the curation step's message, then (training) the repair."""
    message = f"{FIX_INSTRUCTION}\n\n{paragraph}"
    turns = [{"role": "user", "content": message}]
    return turns + ([{"role": "assistant", "content": target}] if target is not None else [])


def _batch(tokenizer, seeds: list[int], rng: random.Random) -> dict[str, torch.Tensor]:
    from mmalign.prompts import MINIGPT4_SYSTEM, encode_conversation, get_template
    from mmalign.toy.pretrain import _pad_batch

    template = get_template("minigpt4_v0")
    examples = []
    for seed in seeds:
        _, text, target = fix_pair(seed)
        system = MINIGPT4_SYSTEM if rng.random() < 0.5 else None  # served (default system) and local (none)
        examples.append(encode_conversation(tokenizer, template, fix_turns(text, target), 0, system=system))
    batch = _pad_batch(examples, tokenizer.pad_token_id)
    batch.pop("slots")
    return batch


@torch.no_grad()
def exact_repair_rate(loaded, seeds: range, batch_size: int = 32) -> dict[str, float]:
    """Share of held-out pairs repaired exactly (greedy), per kind of corruption and overall."""
    from mmalign.chat.generate import generate_batch

    pairs = [fix_pair(s) for s in seeds]
    answers = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        items = [(None, fix_turns(text)) for _, text, _ in chunk]
        answers += generate_batch(loaded, items, system=None, max_new_tokens=160)
    hits: dict[str, list[int]] = {}
    for (kind, _, target), answer in zip(pairs, answers):
        hits.setdefault(kind, []).append(int(answer.strip() == target))
    rates = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    rates["all"] = sum(sum(v) for v in hits.values()) / len(pairs)
    return rates


def train_fix(
    out: Path, minutes: float, batch_size: int = 16, lr: float = 1e-3, seed: int = 0, resume: bool = False
) -> dict:
    """Fine-tune the toy LLM into the fixer for ``minutes`` (wall clock) and save it to ``out``
    with its eval (``fix_eval.json``) and chat template (``mmalign.json``); ``resume`` continues
    from the fixer already in ``out`` (the log of runs is kept in ``fix_eval.json``)."""
    from transformers import LlamaForCausalLM

    from mmalign.model.bundle import LoadedModel
    from mmalign.toy.pretrain import ASSETS, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(ASSETS / "llm")
    model = LlamaForCausalLM.from_pretrained(out if resume else ASSETS / "llm")
    runs = json.loads((out / "fix_eval.json").read_text()).get("runs", []) if resume else []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(seed)
    seeds = iter(tw.split_seeds("pretrain", 10**6)[seed * 10**5 :])  # a new seed, new pairs
    deadline, step = time.time() + minutes * 60, 0
    bar = tqdm(desc="fix model", unit="step")
    model.train()
    while time.time() < deadline:
        frac = 1 - (deadline - time.time()) / (minutes * 60)
        cur = lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = cur
        loss = model(**_batch(tokenizer, [next(seeds) for _ in range(batch_size)], rng)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{cur:.1e}")
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "mmalign.json").write_text(json.dumps({"template": "minigpt4_v0"}, indent=1))
    loaded = LoadedModel.load(out)
    runs.append({"steps": step, "minutes": minutes, "batch_size": batch_size, "lr": lr, "seed": seed})
    result = {"runs": runs, "steps": sum(r["steps"] for r in runs)}
    result["exact_repair_rate"] = exact_repair_rate(loaded, tw.split_seeds("val", 300))
    runs[-1]["exact_repair_rate_after"] = result["exact_repair_rate"]["all"]
    (out / "fix_eval.json").write_text(json.dumps(result, indent=1))
    print("fix model:", json.dumps(result))
    return result


__all__ = ["KINDS", "clean_paragraph", "corrupt", "exact_repair_rate", "fix_pair", "fix_turns", "train_fix"]
