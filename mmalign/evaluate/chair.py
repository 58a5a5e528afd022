"""CHAIR (Rohrbach et al., 2018): how many of the objects a description mentions are not there.

* CHAIRi = hallucinated object mentions / all object mentions (pooled over descriptions);
* CHAIRs = descriptions with at least one hallucinated mention / all descriptions;
* recall = ground-truth objects mentioned / all ground-truth objects.

The scoring is world-agnostic: a description is a list of mentioned object names, the truth a
set of names that may be mentioned and a list of objects to recall. A vocabulary turns text
into names. COCO's (`coco_vocabulary`) is the published synonym table of the 80 categories
(`data/coco_objects.json`) with generated plurals and multi-word phrases ("hot dog" is not a
dog, "teddy bear" not a bear, "baby bird" not a person); the toy world's is exact
(`mmalign.evaluate.toy`). MiniGPT-4 measures CHAIRi on COCO with a long and a short prompt.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from mmalign.evaluate.runner import Sample, Task, read_json

LONG_PROMPT = "Please describe this image as detailed as possible."
SHORT_PROMPT = "Please describe the image shortly and precisely, in less than 20 words."
PROMPTS = {"long": LONG_PROMPT, "short": SHORT_PROMPT}
MAX_NEW_TOKENS = {"long": 512, "short": 64}


# ---------------------------------------------------------------------------------------------
# scoring


def chair_counts(mentions: Sequence[str], allowed: Iterable[str], targets: Sequence[str]) -> tuple[int, int, int]:
    """(hallucinated mentions, all mentions, targets mentioned) for one description.

    Every mention counts (an object named twice and absent is two hallucinations, as in the
    original); a target is recalled once however often it is named."""
    allowed, said = set(allowed), set(mentions)
    return sum(m not in allowed for m in mentions), len(mentions), sum(t in said for t in targets)


def chair_scores(per_text: Sequence[tuple[int, int, int]], n_targets: int) -> dict[str, float]:
    """Pool per-description `chair_counts` (CHAIRi pools mentions; it is not a mean of ratios)."""
    bad = sum(b for b, _, _ in per_text)
    total = sum(m for _, m, _ in per_text)
    return {
        "chair_i": bad / total if total else 0.0,
        "chair_s": sum(b > 0 for b, _, _ in per_text) / len(per_text) if per_text else 0.0,
        "recall": sum(c for _, _, c in per_text) / n_targets if n_targets else 0.0,
        "mentions": total,
        "hallucinated": bad,
    }


# ---------------------------------------------------------------------------------------------
# vocabulary: text -> object names

_INVARIANT = {"sheep", "fish", "deer", "bison", "cattle", "scissors", "skis", "people", "children", "oxen", "series"}
_IRREGULAR = {
    "person": "people",
    "child": "children",
    "mouse": "mice",
    "goose": "geese",
    "ox": "oxen",
    "foot": "feet",
    "tooth": "teeth",
    "calf": "calves",
    "half": "halves",
    "shelf": "shelves",
    "leaf": "leaves",
    "wolf": "wolves",
    "loaf": "loaves",
}


def plural_forms(word: str) -> set[str]:
    """English plurals of a (lower-case) noun, enough for a closed object vocabulary."""
    if word in _INVARIANT:
        return {word}
    if word in _IRREGULAR:
        return {_IRREGULAR[word]}
    if word.endswith("man"):  # man, woman, policeman, gentleman, serviceman
        return {word[:-3] + "men"}
    if word.endswith("knife") or word.endswith("wife"):
        return {word[:-2] + "ves"}
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return {word + "es"}
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return {word[:-1] + "ies"}
    if word.endswith("o") and len(word) > 1 and word[-2] not in "aeiou":
        return {word + "s", word + "es"}
    return {word + "s"}


def words(text: str) -> list[str]:
    """Lower-case alphabetic words; punctuation, digits and hyphens separate words."""
    return re.findall(r"[a-z]+", text.lower())


@dataclass(frozen=True)
class Mention:
    surface: str  # the words as written (lower-case)
    name: str  # the canonical object name
    index: int  # word position in the text


class PhraseVocabulary:
    """Phrases (one or more words, singular or plural) -> canonical names, matched longest first.

    A phrase mapped to None names nothing and hides its words from shorter phrases.
    `suppress[word] = name`: `word` is no mention when the text also mentions `name`.
    """

    def __init__(self, phrases: dict[str, str | None], suppress: dict[str, str] | None = None):
        self.table: dict[tuple[str, ...], str | None] = {}
        self.singular: dict[tuple[str, ...], str] = {}
        for phrase, name in phrases.items():
            ws = tuple(words(phrase))
            if not ws:
                raise ValueError(f"empty vocabulary phrase {phrase!r}")
            for last in {ws[-1], *plural_forms(ws[-1])}:
                key = (*ws[:-1], last)
                self.table.setdefault(key, name)
                self.singular.setdefault(key, " ".join(ws))
        self.longest = max(map(len, self.table), default=1)
        self.suppress = dict(suppress or {})

    def __call__(self, text: str) -> list[Mention]:
        ws, out, i = words(text), [], 0
        while i < len(ws):
            for n in range(min(self.longest, len(ws) - i), 0, -1):
                key = tuple(ws[i : i + n])
                if key in self.table:
                    if (name := self.table[key]) is not None:
                        out.append(Mention(self.singular[key], name, i))
                    i += n
                    break
            else:
                i += 1
        named = {m.name for m in out}
        return [m for m in out if self.suppress.get(m.surface) not in named]

    def names(self, text: str) -> list[str]:
        return [m.name for m in self(text)]


@lru_cache(maxsize=1)
def coco_vocabulary() -> PhraseVocabulary:
    """The 80 COCO categories with CHAIR's synonyms, qualifiers, fixed phrases and suppressions."""
    data = json.loads(resources.files("mmalign.evaluate").joinpath("data/coco_objects.json").read_text())
    phrases: dict[str, str | None] = {}
    for category, synonyms in data["categories"].items():
        for w in (category, *synonyms):
            phrases[w] = category
    for phrase, name in data["phrases"].items():
        phrases[phrase] = name
    for qualifier, nouns in data["qualifiers"].items():
        for noun in nouns:
            phrases[f"{qualifier} {noun}"] = phrases.get(noun)  # None when the noun names no category
    return PhraseVocabulary(phrases, data["suppress"])


# ---------------------------------------------------------------------------------------------
# COCO ground truth and the benchmark


def coco_objects(instances: dict, captions: dict | None, vocab: PhraseVocabulary | None = None) -> dict[int, set[str]]:
    """Objects per image: the categories of its instance annotations plus the objects its
    reference captions name (CHAIR's ground truth uses both)."""
    vocab = vocab or coco_vocabulary()
    cat_name = {c["id"]: c["name"] for c in instances["categories"]}
    objects: dict[int, set[str]] = {im["id"]: set() for im in instances["images"]}
    for ann in instances["annotations"]:
        if ann["image_id"] in objects:
            objects[ann["image_id"]].add(cat_name[ann["category_id"]])  # category names are the canonical names
    for ann in (captions or {}).get("annotations", []):
        if ann["image_id"] in objects:
            objects[ann["image_id"]].update(vocab.names(ann["caption"]))
    return objects


def load_coco(data: Path | None, images: Path | None, options: dict[str, Any]) -> list[Sample]:
    """`data`: a COCO root with `annotations/instances_{split}.json`, `annotations/captions_{split}.json`
    and `{split}/` images (split `val2014` by default). `limit` images drawn with `seed`
    (CHAIR papers use 500 random val2014 images); each gets the long and the short prompt."""
    if data is None:
        raise ValueError("--task chair needs --data COCO_ROOT")
    split = options.get("split") or "val2014"
    instances = read_json(data / "annotations" / f"instances_{split}.json")
    captions = read_json(data / "annotations" / f"captions_{split}.json")
    objects = coco_objects(instances, captions)
    files = {im["id"]: im["file_name"] for im in instances["images"]}
    ids = sorted(files)
    if options.get("limit"):
        ids = sorted(random.Random(options.get("seed", 0)).sample(ids, min(options["limit"], len(ids))))
    folder = images or data / split
    samples = []
    for kind in options.get("prompts") or ("long", "short"):
        for i in ids:
            samples.append(
                Sample(
                    id=f"{kind}/{i}",
                    prompt=PROMPTS[kind],
                    image=lambda p=folder / files[i]: _open(p),
                    truth={"prompt_kind": kind, "image_id": i, "objects": sorted(objects[i])},
                    max_new_tokens=MAX_NEW_TOKENS[kind],
                )
            )
    return samples


def _open(path: Path):
    from PIL import Image

    return Image.open(path)


def describe_stats(texts: Sequence[str]) -> dict[str, float]:
    """Length in words, as the paper reports next to CHAIRi."""
    return {"mean_words": sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0}


def score_coco(records: list[dict[str, Any]]) -> dict[str, Any]:
    vocab = coco_vocabulary()
    out: dict[str, Any] = {}
    for kind in PROMPTS:
        recs = [r for r in records if r["truth"]["prompt_kind"] == kind]
        if not recs:
            continue
        per = [chair_counts(vocab.names(r["prediction"]), r["truth"]["objects"], r["truth"]["objects"]) for r in recs]
        n_targets = sum(len(r["truth"]["objects"]) for r in recs)
        out[kind] = {
            "prompt": PROMPTS[kind],
            "n": len(recs),
            **chair_scores(per, n_targets),
            **describe_stats([r["prediction"] for r in recs]),
        }
    return out


def rows_coco(metrics: dict[str, Any]) -> list[tuple[str, tuple[str, ...], str]]:
    rows = []
    for kind in PROMPTS:
        rows += [
            (f"CHAIRi, {kind} prompt", (kind, "chair_i"), "{:.1%}"),
            (f"CHAIRs, {kind} prompt", (kind, "chair_s"), "{:.1%}"),
            (f"object recall, {kind} prompt", (kind, "recall"), "{:.1%}"),
            (f"mean words, {kind} prompt", (kind, "mean_words"), "{:.1f}"),
        ]
    return rows


def notes_coco(by_model: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name, m in by_model.items():
        if "long" in m and "short" in m:
            out.append(
                f"- {name}: CHAIRi short prompt {m['short']['chair_i']:.1%} ({m['short']['mean_words']:.1f} words) vs "
                f"long {m['long']['chair_i']:.1%} ({m['long']['mean_words']:.1f} words); MiniGPT-4 reports 7.2% "
                "(28.8 words) vs 9.6% (175 words)"
            )
    return out


TASK = Task(
    "chair", load_coco, score_coco, rows_coco, "CHAIRi / CHAIRs on COCO, long and short description prompts", notes_coco
)
