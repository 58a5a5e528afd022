"""Evaluation on held-out toy scenes, where the ground truth is exact.

* VQA: accuracy per question kind (colour, shape, count, position, relation); presence yes / no
  as precision / recall / F1 with "yes" the positive class.
* Detailed descriptions: CHAIRi (mentioned objects absent from the scene / all mentioned
  objects), CHAIRs (descriptions with at least one), object recall, mean length in words, and
  the repeated-trigram rate (share of word trigrams that already occurred in the same text),
  the repeated-sentence rate (share of sentences said twice verbatim), the unfinished rate
  (descriptions that stop mid-sentence) and the malformed-sentence rate (sentences the toy
  grammar cannot read), which is how the paper's "repetitive, fragmented" output shows up in
  numbers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmalign.data import toyworld as tw
from mmalign.evaluate.chair import SHORT_PROMPT, chair_counts, chair_scores
from mmalign.evaluate.pope import yes_no_metrics
from mmalign.evaluate.runner import Sample, Task, run_task
from mmalign.prompts import MINIGPT4_INSTRUCTIONS

if TYPE_CHECKING:
    from mmalign.model.bundle import LoadedModel

LONG_PROMPT = MINIGPT4_INSTRUCTIONS[0]  # "Describe this image in detail." (what the toy trains on)
DESCRIBE_PROMPTS = {"long": LONG_PROMPT, "short": SHORT_PROMPT}


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def repeated_sentence_rate(text: str) -> float:
    """Share of sentences that repeat an earlier sentence of the same text verbatim."""
    sents = [x.strip().lower() for x in text.replace("?", ".").replace("!", ".").split(".") if x.strip()]
    return 0.0 if not sents else 1.0 - len(set(sents)) / len(sents)


def unfinished(text: str) -> bool:
    """The text stops mid-sentence (no final . ! ?), as a cut-off answer does."""
    return text.rstrip()[-1:] not in (".", "!", "?")


def malformed_sentence_rate(text: str) -> float:
    """Share of sentences the toy world's grammar cannot read: fragments, broken sentences,
    stray words (e.g. "zero" after a description). Toy only: real text has no such grammar."""
    parts = tw.sentences(text)
    return 1.0 if not parts else sum(tw.parse_sentence(s) is None for s in parts) / len(parts)


def toy_names(text: str) -> list[str]:
    """The toy vocabulary: objects a text names, "red circle" or a bare "circle"."""
    return [f"{c} {s}" if c else s for c, s in tw.mentioned_objects(text)]


def toy_truth(scene: tw.Scene) -> tuple[set[str], list[str]]:
    """(names that may be said, objects to recall): a bare shape is right if any object has it;
    each object is recalled by its colour + shape."""
    allowed = {f"{o.colour} {o.shape}" for o in scene.objects} | {o.shape for o in scene.objects}
    return allowed, [f"{o.colour} {o.shape}" for o in scene.objects]


def chair(description: str, scene: tw.Scene) -> tuple[int, int, int]:
    """(hallucinated mentions, all mentions, scene objects mentioned) for one description."""
    return chair_counts(toy_names(description), *toy_truth(scene))


def presence_f1(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """pairs of (prediction, truth) for yes / no questions; "yes" is the positive class."""
    m = yes_no_metrics(pairs)
    return {k: m[k] for k in ("precision", "recall", "f1", "yes_ratio")}


def describe_metrics(texts: list[str], scenes: list[tw.Scene]) -> dict[str, float]:
    per = [chair(t, s) for t, s in zip(texts, scenes)]
    c = chair_scores(per, sum(len(s.objects) for s in scenes))
    n = max(len(texts), 1)
    return {
        "chair_i": c["chair_i"],
        "chair_s": c["chair_s"],
        "object_recall": c["recall"],
        "mean_words": sum(len(t.split()) for t in texts) / n,
        "repeated_trigram_rate": sum(map(repeated_ngram_rate, texts)) / n,
        "repeated_sentence_rate": sum(map(repeated_sentence_rate, texts)) / n,
        "unfinished_rate": sum(map(unfinished, texts)) / n,
        "malformed_sentence_rate": sum(map(malformed_sentence_rate, texts)) / n,
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


def toy_samples(
    n_scenes: int = 200, split: str = "test", seed: int = 0, describe_prompts: dict[str, str] | None = None
) -> list[Sample]:
    """Every toy question about `n_scenes` held-out scenes, then a description of each per prompt."""
    rng = random.Random(seed)
    scenes = [tw.make_scene(s) for s in tw.split_seeds(split, n_scenes)]
    image = lambda scene: lambda: tw.render(scene)  # noqa: E731
    out = []
    for scene in scenes:
        for k, qa in enumerate(tw.questions(scene, rng)):
            out.append(
                Sample(
                    f"qa/{scene.seed}/{k}",
                    qa.question,
                    image(scene),
                    {"kind": qa.kind, "answer": qa.answer, "scene": scene.seed},
                    max_new_tokens=8,
                )
            )
    for name, prompt in (describe_prompts or DESCRIBE_PROMPTS).items():
        for scene in scenes:
            out.append(
                Sample(
                    f"describe_{name}/{scene.seed}",
                    prompt,
                    image(scene),
                    {"kind": f"describe_{name}", "scene": scene.to_dict(), "listing": tw.listing(scene)},
                    max_new_tokens=120,
                )
            )
    return out


def score_toy(records: list[dict[str, Any]]) -> dict[str, Any]:
    """VQA accuracy per kind, presence F1, and per description prompt CHAIR / length / repetition."""
    by_kind: dict[str, list[int]] = {}
    yes_no: list[tuple[str, str]] = []
    described: dict[str, list[tuple[str, tw.Scene, str]]] = {}
    scenes = set()
    for r in records:
        t, pred = r["truth"], r["prediction"]
        if t["kind"].startswith("describe_"):
            scene = tw.Scene.from_dict(t["scene"])
            described.setdefault(t["kind"], []).append((pred, scene, r["prompt"]))
            scenes.add(scene.seed)
            continue
        pred = pred.strip().lower().rstrip(".")
        by_kind.setdefault(t["kind"], []).append(int(pred == t["answer"]))
        scenes.add(t["scene"])
        if t["kind"] == "presence":
            yes_no.append((pred, t["answer"]))
    metrics: dict[str, Any] = {"n_scenes": len(scenes), "n_questions": sum(map(len, by_kind.values()))}
    metrics["vqa_accuracy"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    metrics["presence"] = presence_f1(yes_no)
    for kind, items in described.items():
        texts, scns, prompts = zip(*items)
        metrics[kind] = {"prompt": prompts[0], **describe_metrics(list(texts), list(scns))}
    return metrics


def toy_notes(by_model: dict[str, dict[str, Any]]) -> list[str]:
    """The paper's two observations, read off the numbers: stage 2 vs stage 1 on the detailed
    prompt, and short vs long prompt CHAIRi (MiniGPT-4: 7.2 vs 9.6 on COCO)."""
    get = lambda m, k, f: m.get(k, {}).get(f)  # noqa: E731
    notes = ["Observations (computed from the table):", ""]
    names = list(by_model)
    if len(names) >= 2:
        a, b = by_model[names[0]], by_model[names[-1]]
        for field, what in (
            ("chair_i", "CHAIRi"),
            ("mean_words", "mean words"),
            ("repeated_sentence_rate", "repeated-sentence rate"),
            ("repeated_trigram_rate", "repeated-trigram rate"),
        ):
            x, y = get(a, "describe_long", field), get(b, "describe_long", field)
            if x is not None and y is not None:
                notes.append(f"- detailed prompt, {what}: {names[0]} {x:.3g} -> {names[-1]} {y:.3g}")
    for name, m in by_model.items():
        lo, sh = get(m, "describe_long", "chair_i"), get(m, "describe_short", "chair_i")
        if lo is not None and sh is not None:
            verdict = "lower" if sh < lo else "not lower"
            notes.append(
                f"- {name}: CHAIRi short prompt {sh:.1%} vs detailed {lo:.1%} ({verdict}; paper: 7.2% vs 9.6%)"
            )
    return notes if len(notes) > 2 else []


def load_toy(data: Path | None, images: Path | None, options: dict[str, Any]) -> list[Sample]:
    """The toy world needs no files: held-out scenes are generated (`n_scenes`, default 200, of
    the `split` test or val)."""
    return toy_samples(options.get("n_scenes") or 200, options.get("split") or "test", seed=options.get("seed", 0))


def _toy_rows(metrics: dict[str, Any]) -> list:
    from mmalign.evaluate.report import ROWS

    return ROWS


TASK = Task(
    "toy", load_toy, score_toy, _toy_rows, "toy world: VQA per kind, presence F1, CHAIR long vs short", toy_notes
)


def evaluate_toy(
    loaded: LoadedModel,
    *,
    n_scenes: int = 200,
    split: str = "test",
    batch_size: int = 64,
    seed: int = 0,
    describe_prompts: dict[str, str] | None = None,
) -> ToyEval:
    """Greedy answers to every toy question and detailed / short descriptions of `n_scenes` scenes."""
    samples = toy_samples(n_scenes, split, seed, describe_prompts)
    result = run_task(TASK, samples, None, loaded, batch_size=batch_size)
    return ToyEval(result.metrics, result.records)
