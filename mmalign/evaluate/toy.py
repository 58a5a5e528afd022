"""Evaluation on held-out toy scenes, where the ground truth is exact.

* VQA: accuracy per question kind (colour, shape, count, position, relation); presence yes / no
  as precision / recall / F1 with "yes" the positive class.
* Detailed descriptions: CHAIRi (mentioned objects absent from the scene / all mentioned
  objects), CHAIRs (descriptions with at least one), object recall, mean length in words, and
  the repeated-trigram rate (share of word trigrams that already occurred in the same text),
  and the repeated-sentence rate (share of sentences said twice verbatim), which is how the
  paper's "repetitive, fragmented" output shows up in numbers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmalign.chat.generate import generate_batch
from mmalign.data import toyworld as tw
from mmalign.prompts import MINIGPT4_INSTRUCTIONS, user_with_image

LONG_PROMPT = MINIGPT4_INSTRUCTIONS[0]  # "Describe this image in detail."
SHORT_PROMPT = "Please describe the image shortly and precisely, in less than 20 words."


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def repeated_sentence_rate(text: str) -> float:
    """Share of sentences that repeat an earlier sentence of the same text verbatim."""
    sents = [x.strip().lower() for x in text.replace("?", ".").replace("!", ".").split(".") if x.strip()]
    return 0.0 if not sents else 1.0 - len(set(sents)) / len(sents)


def chair(description: str, scene: tw.Scene) -> tuple[int, int, int]:
    """(hallucinated mentions, all mentions, scene objects mentioned) for one description."""
    mentions = tw.mentioned_objects(description)
    bad = sum(not (scene.has(c, s) if c else scene.count(shape=s)) for c, s in mentions)
    covered = sum(any(o.colour == c and o.shape == s for c, s in mentions) for o in scene.objects)
    return bad, len(mentions), covered


def presence_f1(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """pairs of (prediction, truth) for yes / no questions; "yes" is the positive class."""
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p != "yes" and t == "yes" for p, t in pairs)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    yes_ratio = sum(p == "yes" for p, _ in pairs) / max(len(pairs), 1)
    return {"precision": prec, "recall": rec, "f1": f1, "yes_ratio": yes_ratio}


def describe_metrics(texts: list[str], scenes: list[tw.Scene]) -> dict[str, float]:
    bad = total = covered = n_obj = with_bad = 0
    for text, scene in zip(texts, scenes):
        b, m, c = chair(text, scene)
        bad, total, covered, n_obj, with_bad = bad + b, total + m, covered + c, n_obj + len(scene.objects), with_bad + (b > 0)
    return {
        "chair_i": bad / max(total, 1),
        "chair_s": with_bad / max(len(texts), 1),
        "object_recall": covered / max(n_obj, 1),
        "mean_words": sum(len(t.split()) for t in texts) / max(len(texts), 1),
        "repeated_trigram_rate": sum(map(repeated_ngram_rate, texts)) / max(len(texts), 1),
        "repeated_sentence_rate": sum(map(repeated_sentence_rate, texts)) / max(len(texts), 1),
    }


@dataclass
class ToyEval:
    metrics: dict[str, Any]
    samples: list[dict[str, Any]]

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(self.metrics, indent=1))
        with open(out / "predictions.jsonl", "w") as f:
            for s in self.samples:
                f.write(json.dumps(s) + "\n")


def evaluate_toy(
    model: Any,
    tokenizer: Any,
    template: str,
    image_transform: Callable,
    *,
    n_scenes: int = 200,
    split: str = "test",
    batch_size: int = 64,
    seed: int = 0,
    describe_prompts: dict[str, str] | None = None,
) -> ToyEval:
    """Greedy answers to every toy question and detailed / short descriptions of `n_scenes` scenes."""
    rng = random.Random(seed)
    scenes = [tw.make_scene(s) for s in tw.split_seeds(split, n_scenes)]
    images = [tw.render(s) for s in scenes]
    qa_items, qa_meta = [], []
    for i, scene in enumerate(scenes):
        for qa in tw.questions(scene, rng):
            qa_items.append((images[i], [{"role": "user", "content": user_with_image(template, qa.question)}]))
            qa_meta.append((i, qa))
    answers = generate_batch(model, tokenizer, template, qa_items, image_transform, batch_size=batch_size,
                             max_new_tokens=8)  # fmt: skip
    by_kind: dict[str, list[int]] = {}
    yes_no: list[tuple[str, str]] = []
    samples = []
    for (i, qa), pred in zip(qa_meta, answers):
        pred = pred.strip().lower().rstrip(".")
        by_kind.setdefault(qa.kind, []).append(int(pred == qa.answer))
        if qa.kind == "presence":
            yes_no.append((pred, qa.answer))
        samples.append({"scene": scenes[i].seed, "kind": qa.kind, "question": qa.question, "answer": qa.answer, "prediction": pred})
    metrics: dict[str, Any] = {"n_scenes": n_scenes, "n_questions": len(qa_items)}
    metrics["vqa_accuracy"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    metrics["presence"] = presence_f1(yes_no)
    for name, prompt in (describe_prompts or {"long": LONG_PROMPT, "short": SHORT_PROMPT}).items():
        items = [(im, [{"role": "user", "content": user_with_image(template, prompt)}]) for im in images]
        texts = generate_batch(model, tokenizer, template, items, image_transform, batch_size=batch_size,
                               max_new_tokens=120)  # fmt: skip
        metrics[f"describe_{name}"] = {"prompt": prompt, **describe_metrics(texts, scenes)}
        samples += [{"scene": s.seed, "kind": f"describe_{name}", "prompt": prompt, "truth": tw.listing(s),
                     "prediction": t} for s, t in zip(scenes, texts)]  # fmt: skip
    return ToyEval(metrics, samples)
