"""CHAIR (Rohrbach et al., 2018): how many of the objects a description mentions are not there.

* CHAIRi = hallucinated object mentions / all object mentions (pooled over descriptions);
* CHAIRs = descriptions with at least one hallucinated mention / all descriptions;
* recall = ground-truth objects mentioned / all ground-truth objects.

The scoring is world-agnostic: a description is a list of mentioned object names, the truth a
set of names that may be mentioned and a list of objects to recall. A vocabulary turns text
into names. COCO has two (`coco_vocabulary`), both on the published synonym table of the 80
categories (`data/coco_objects.json`) and on the words nltk splits as the reference does:
`reference` reproduces the original code's counts exactly, its bugs included, so figures
compare with published CHAIR numbers; `default` corrects them (every word in singular and
plural, multi-word phrases longest first: "hot dog" is not a dog, "teddy bear" not a bear,
"baby bird" not a person). docs/eval.md lists every difference. The toy world's vocabulary is
exact (`mmalign.evaluate.toy`). MiniGPT-4 measures CHAIRi on COCO with a long and a short prompt.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
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
# words: the reference's tokenisation (nltk) and its singulariser (Pattern)


@lru_cache(maxsize=1)
def _nltk_tokenizers() -> tuple[Any, Any]:
    try:
        from nltk.tokenize import NLTKWordTokenizer, PunktSentenceTokenizer
    except ImportError:
        raise ImportError(
            "CHAIR on COCO splits words as its reference implementation does, with nltk: pip install 'mmalign[eval]'"
        ) from None
    return PunktSentenceTokenizer(), NLTKWordTokenizer()


def tokenize(text: str) -> list[str]:
    """The reference's words: nltk's `word_tokenize` of the lower-cased text ("man-made",
    "cat/dog" and "o'clock" stay one token; "dog's" is "dog", "'s").

    `word_tokenize` splits sentences with Punkt's English model, which is data nltk downloads
    at run time; an untrained Punkt splitter needs none and splits the same way wherever the
    words matter here (the English model differs only at its ~150 abbreviations, none of them
    an object word), so the tokens of object words are the same."""
    return list(_tokens(text))


@lru_cache(maxsize=1 << 16)  # ground-truth captions are tokenised once for both vocabularies
def _tokens(text: str) -> tuple[str, ...]:
    sentences, words_of = _nltk_tokenizers()
    return tuple(w for sentence in sentences.tokenize(text.lower()) for w in words_of.tokenize(sentence))


# Pattern 3.6's `singularize` (pattern/text/en/inflect.py), which the reference applies to every
# token, reduced to the steps that decide whether a token is one of CHAIR's words: checked
# against Pattern itself on 104k English words and every vocabulary word's plural forms
# (tests/evaluate/data/pattern_singular.json). Its bugs are kept: "bus" -> "bu" (so a singular
# bus never counts), "doggies" -> "doggies", "ties" -> "ty".
_PATTERN_KEEP = ("scissors",)  # a word that is the end of one of these is kept as it is
_PATTERN_IE_KEEP = ("doggie", "collie")  # their "-ies" plural comes back unchanged
_PATTERN_IRREGULAR = (("children", "child"), ("people", "person"), ("geese", "goose"), ("oxen", "ox"), ("men", "man"))
_PATTERN_RULES = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^(ox)en", r"\1"),  # not anchored at the end: "oxens" -> "oxs"
        (r"(o)es$", r"\1"),
        (r"(bus)es$", r"\1"),
        (r"([ml])ice$", r"\1ouse"),
        (r"(x|ch|ss|sh)es$", r"\1"),
        (r"([^aeiouy]|qu)ies$", r"\1y"),
        (r"([aeo]l)ves$", r"\1f"),
        (r"([nlw]i)ves$", r"\1fe"),
        (r"([aeo])ves$", r"\1ve"),
        (r"s$", ""),
    )
)


def pattern_singularize(word: str) -> str:
    """Pattern's singular of a lower-case token, exact wherever the result is a CHAIR word.
    A token with a hyphen or a final apostrophe never becomes one: it is returned as it is."""
    if "-" in word or word.endswith("'") or any(keep.endswith(word) for keep in _PATTERN_KEEP):
        return word
    if any(word.endswith(ie + "s") for ie in _PATTERN_IE_KEEP):
        return word
    for plural, singular in _PATTERN_IRREGULAR:
        if word.endswith(plural):
            return word[: -len(plural)] + singular
    for pattern, replacement in _PATTERN_RULES:
        if pattern.search(word):
            return pattern.sub(replacement, word)
    return word


# ---------------------------------------------------------------------------------------------
# vocabulary: text -> object names

_INVARIANT = {"sheep", "fish", "deer", "bison", "cattle", "scissors", "skis", "people", "children", "oxen", "series"}
_IRREGULAR = {"mouse": "mice", "goose": "geese", "ox": "oxen", "foot": "feet", "tooth": "teeth"}
_IRREGULAR_ENDINGS = {  # also as the end of a longer word: grandchild, salesperson, policeman
    "child": ("children",),
    "person": ("people", "persons"),
    "man": ("men",),
    "knife": ("knives",),
    "wife": ("wives",),
    "calf": ("calves",),
    "half": ("halves",),
    "shelf": ("shelves",),
    "leaf": ("leaves",),
    "wolf": ("wolves",),
    "loaf": ("loaves",),
}


def plural_forms(word: str) -> set[str]:
    """English plurals of a (lower-case) noun, enough for a closed object vocabulary, and the
    regular "-s" / "-es" form beside an irregular one ("calfs", "peoples": models write them, and
    the reference counts them)."""
    regular = word + "es" if word.endswith(("s", "x", "z", "ch", "sh")) else word + "s"
    if word in _INVARIANT:
        return {word} if word.endswith("s") else {word, regular}
    if word in _IRREGULAR:
        return {_IRREGULAR[word], regular}
    for ending, plurals in _IRREGULAR_ENDINGS.items():
        if word.endswith(ending):
            return {word[: -len(ending)] + p for p in plurals} | {regular}
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return {word[:-1] + "ies", regular}
    if word.endswith("o") and len(word) > 1 and word[-2] not in "aeiou":
        return {word + "s", word + "es"}
    return {regular}


def words(text: str) -> list[str]:
    """Lower-case alphabetic words; punctuation, digits and hyphens separate words (the toy
    world's and `PhraseVocabulary`'s default; COCO uses `tokenize`)."""
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
    `split(text)` gives the words to match (default: `words`).
    """

    def __init__(
        self,
        phrases: dict[str, str | None],
        suppress: dict[str, str] | None = None,
        split: Callable[[str], list[str]] = words,
    ):
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
        self.split = split

    def __call__(self, text: str) -> list[Mention]:
        ws, out, i = self.split(text), [], 0
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


class CocoVocabulary(PhraseVocabulary):
    """A `PhraseVocabulary` on the reference's nltk words, where a slash separates words
    ("cat/dog") and a hyphenated word is the phrase its parts spell when that is a vocabulary
    phrase ("hot-dog", "teddy-bear"), else one word that names nothing ("man-made")."""

    def __init__(self, phrases: dict[str, str | None], suppress: dict[str, str] | None = None):
        super().__init__(phrases, suppress, split=self.compound_words)

    def compound_words(self, text: str) -> list[str]:
        out: list[str] = []
        for token in tokenize(text):
            for part in token.split("/"):
                pieces = tuple(part.split("-"))
                out += list(pieces) if len(pieces) > 1 and pieces in self.table else [part]
        return out


class ReferenceVocabulary:
    """The original chair.py's `caption_to_words`, reproduced: nltk tokens, each singularised
    by Pattern, two-word phrases merged left to right, "seat" dropped when the word "toilet" is
    there, then every word of its synonym table (as it matches, quirks included) is a mention."""

    def __init__(self, synonyms: dict[str, str], pairs: dict[str, str]):
        self.synonyms, self.pairs = synonyms, pairs

    def names(self, text: str) -> list[str]:
        ws, merged, i = [pattern_singularize(w) for w in tokenize(text)], [], 0
        while i < len(ws):
            pair = " ".join(ws[i : i + 2])
            merged.append(self.pairs.get(pair, ws[i]))
            i += 2 if pair in self.pairs else 1
        if "toilet" in merged and "seat" in merged:
            merged = [w for w in merged if w != "seat"]
        return [self.synonyms[w] for w in merged if w in self.synonyms]


VOCABULARIES = ("default", "reference")


@lru_cache(maxsize=2)
def coco_vocabulary(kind: str = "default") -> CocoVocabulary | ReferenceVocabulary:
    """The 80 COCO categories with CHAIR's synonyms. `default`: every word in singular and plural,
    phrases longest first, qualifiers, fixed phrases and suppressions (docs/eval.md lists how it
    departs from the original); `reference`: the original code's counts, bugs included."""
    data = json.loads(resources.files("mmalign.evaluate").joinpath("data/coco_objects.json").read_text())
    synonyms = {w: category for category, syns in data["categories"].items() for w in (category, *syns)}
    if kind == "reference":
        ref = data["reference"]
        synonyms = {w: c for w, c in synonyms.items() if w not in ref["unmatched"]} | ref["extra_synonyms"]
        pairs = {p: p for p in ref["pairs"]} | ref["pair_map"]
        pairs |= {f"{q} {noun}": noun for q, nouns in data["qualifiers"].items() for noun in nouns}
        return ReferenceVocabulary(synonyms, pairs)
    if kind != "default":
        raise ValueError(f"unknown CHAIR vocabulary {kind!r}; known: {VOCABULARIES}")
    phrases: dict[str, str | None] = dict(synonyms) | data["phrases"]
    for qualifier, nouns in data["qualifiers"].items():
        for noun in nouns:
            phrases[f"{qualifier} {noun}"] = phrases.get(noun)  # None when the noun names no category
    return CocoVocabulary(phrases, data["suppress"])


# ---------------------------------------------------------------------------------------------
# COCO ground truth and the benchmark


def coco_objects(
    instances: dict,
    captions: dict | None,
    vocab: PhraseVocabulary | ReferenceVocabulary | None = None,
    image_ids: Iterable[int] | None = None,
) -> dict[int, set[str]]:
    """Objects per image (all, or `image_ids`): the categories of its instance annotations plus
    the objects its reference captions name (CHAIR's ground truth uses both)."""
    vocab = vocab or coco_vocabulary()
    cat_name = {c["id"]: c["name"] for c in instances["categories"]}
    ids = image_ids if image_ids is not None else (im["id"] for im in instances["images"])
    objects: dict[int, set[str]] = {i: set() for i in ids}
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
    (CHAIR papers use 500 random val2014 images); each gets the long and the short prompt.
    The truth holds the objects by both vocabularies, so both CHAIRs are scored."""
    if data is None:
        raise ValueError("--task chair needs --data COCO_ROOT")
    split = options.get("split") or "val2014"
    instances = read_json(data / "annotations" / f"instances_{split}.json")
    captions = read_json(data / "annotations" / f"captions_{split}.json")
    files = {im["id"]: im["file_name"] for im in instances["images"]}
    ids = sorted(files)
    if options.get("limit"):
        ids = sorted(random.Random(options.get("seed", 0)).sample(ids, min(options["limit"], len(ids))))
    objects = {kind: coco_objects(instances, captions, coco_vocabulary(kind), ids) for kind in VOCABULARIES}
    folder = images or data / split
    samples = []
    for kind in options.get("prompts") or ("long", "short"):
        for i in ids:
            truth = {"prompt_kind": kind, "image_id": i, "objects": sorted(objects["default"][i])}
            truth["objects_reference"] = sorted(objects["reference"][i])
            samples.append(
                Sample(
                    id=f"{kind}/{i}",
                    prompt=PROMPTS[kind],
                    image=lambda p=folder / files[i]: _open(p),
                    truth=truth,
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


def _chair_of(records: list[dict[str, Any]], kind: str, objects_key: str) -> dict[str, float]:
    vocab = coco_vocabulary(kind)
    per = [
        chair_counts(vocab.names(r["prediction"]), r["truth"][objects_key], r["truth"][objects_key]) for r in records
    ]
    return chair_scores(per, sum(len(r["truth"][objects_key]) for r in records))


def score_coco(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per prompt: CHAIR by the default vocabulary, and under `reference` by the original code's
    (when the records carry its ground truth; records saved before it existed do not)."""
    out: dict[str, Any] = {}
    for kind in PROMPTS:
        recs = [r for r in records if r["truth"]["prompt_kind"] == kind]
        if not recs:
            continue
        out[kind] = {
            "prompt": PROMPTS[kind],
            "n": len(recs),
            **_chair_of(recs, "default", "objects"),
            **describe_stats([r["prediction"] for r in recs]),
        }
        if all("objects_reference" in r["truth"] for r in recs):
            out[kind]["reference"] = _chair_of(recs, "reference", "objects_reference")
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
        if "reference" in metrics.get(kind, {}):
            rows += [
                (f"CHAIRi (original code), {kind} prompt", (kind, "reference", "chair_i"), "{:.1%}"),
                (f"CHAIRs (original code), {kind} prompt", (kind, "reference", "chair_s"), "{:.1%}"),
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
