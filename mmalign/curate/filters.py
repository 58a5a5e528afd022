"""Rule filters, as data: each rule has a name and a kind, and says why it drops a text.

A config lists rules as mappings (``{name: apology, kind: phrases, phrases: ["I apologize"]}``;
``kind`` defaults to ``name``). The first rule that matches names the drop; every rule that
matched is kept in the record for the audit. The kinds:

| kind | drops a text that ... | parameters |
|---|---|---|
| ``phrases`` | contains one of the phrases (case-insensitive, any apostrophe) | ``phrases`` |
| ``too_short`` / ``too_long`` | has fewer / more words than the limit | ``min_words`` / ``max_words`` |
| ``repeated_sentences`` | repeats sentences: share above ``max_rate`` | ``max_rate`` |
| ``repeated_ngrams`` | repeats word n-grams: share above ``max_rate`` | ``n``, ``max_rate`` |
| ``not_english`` | is mostly non-ASCII, or has few English function words | ``max_non_ascii``, ``min_function_words`` |
| ``unfinished`` | stops mid-sentence (no final . ! ? or quote) | |
| ``ignores_image`` | is the same text given for ``max_images`` or more different images | ``max_images`` |
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from mmalign.evaluate.toy import repeated_ngram_rate, repeated_sentence_rate

FAILURE_PHRASES = (
    "I'm sorry",
    "I am sorry",
    "I apologize",
    "I made a mistake",
    "As an AI",
    "as a language model",
    "I cannot see",
    "I can't see",
    "I am unable to",
    "I'm unable to",
    "there is no image",
    "without explanation",
)
"""MiniGPT-4's known failure phrases ("I'm sorry I made a mistake", "I apologize") and their
family; the last is the fix instruction echoed back."""

_FUNCTION_WORDS = frozenset(
    "a an the and or but of in on at to for with from by as is are was were be been it its this that these "
    "there here which who what where when has have had not no can will would should could also into over "
    "under between above below left right".split()
)


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W\d_]+(?:'[^\W\d_]+)?", text.lower())


@dataclass(frozen=True)
class Rule:
    """A named rule; ``check`` returns None to keep a text, else a short reason."""

    name: str
    kind: ClassVar[str] = ""

    def prepare(self, texts: Sequence[str]) -> None:
        """Look at every text of the run first (rules that compare texts with each other)."""

    def check(self, text: str) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Phrases(Rule):
    phrases: tuple[str, ...] = FAILURE_PHRASES
    kind: ClassVar[str] = "phrases"

    def check(self, text: str) -> str | None:
        norm = text.replace("\u2019", "'").lower()
        hit = next((p for p in self.phrases if p.replace("\u2019", "'").lower() in norm), None)
        return None if hit is None else f"contains {hit!r}"


@dataclass(frozen=True)
class TooShort(Rule):
    min_words: int = 20
    kind: ClassVar[str] = "too_short"

    def check(self, text: str) -> str | None:
        n = len(text.split())
        return f"{n} words < {self.min_words}" if n < self.min_words else None


@dataclass(frozen=True)
class TooLong(Rule):
    max_words: int = 500
    kind: ClassVar[str] = "too_long"

    def check(self, text: str) -> str | None:
        n = len(text.split())
        return f"{n} words > {self.max_words}" if n > self.max_words else None


@dataclass(frozen=True)
class RepeatedSentences(Rule):
    max_rate: float = 0.0  # 0: one sentence said twice is enough
    kind: ClassVar[str] = "repeated_sentences"

    def check(self, text: str) -> str | None:
        rate = repeated_sentence_rate(text)
        return f"{rate:.0%} of sentences repeated" if rate > self.max_rate else None


@dataclass(frozen=True)
class RepeatedNgrams(Rule):
    n: int = 4
    max_rate: float = 0.3
    kind: ClassVar[str] = "repeated_ngrams"

    def check(self, text: str) -> str | None:
        rate = repeated_ngram_rate(text, self.n)
        return f"{rate:.0%} of {self.n}-grams repeated" if rate > self.max_rate else None


@dataclass(frozen=True)
class NotEnglish(Rule):
    max_non_ascii: float = 0.2  # share of letters outside ASCII
    min_function_words: float = 0.1  # share of words that are English function words
    min_words: int = 5  # shorter texts are not judged by function words
    kind: ClassVar[str] = "not_english"

    def check(self, text: str) -> str | None:
        letters = [c for c in text if c.isalpha()]
        if not letters:
            return "no letters"
        non_ascii = sum(not c.isascii() for c in letters) / len(letters)
        if non_ascii > self.max_non_ascii:
            return f"{non_ascii:.0%} non-ASCII letters"
        words = _words(text)
        share = sum(w in _FUNCTION_WORDS for w in words) / max(len(words), 1)
        if len(words) >= self.min_words and share < self.min_function_words:
            return f"{share:.0%} English function words"
        return None


@dataclass(frozen=True)
class Unfinished(Rule):
    kind: ClassVar[str] = "unfinished"

    def check(self, text: str) -> str | None:
        end = text.rstrip()[-1:]
        return None if end and end in ".!?\"'\u201d)" else f"ends with {text.rstrip()[-12:]!r}"


@dataclass(frozen=True)
class IgnoresImage(Rule):
    """The same description for many different images says nothing about any of them."""

    max_images: int = 3
    counts: Counter = field(default_factory=Counter, compare=False, repr=False)
    kind: ClassVar[str] = "ignores_image"

    @staticmethod
    def _key(text: str) -> str:
        return " ".join(_words(text))

    def prepare(self, texts: Sequence[str]) -> None:
        self.counts.clear()
        self.counts.update(self._key(t) for t in texts)

    def check(self, text: str) -> str | None:
        n = self.counts.get(self._key(text), 0)
        return f"the same text for {n} images" if n >= self.max_images else None


RULE_KINDS: dict[str, type[Rule]] = {
    cls.kind: cls for cls in (Phrases, TooShort, TooLong, RepeatedSentences, RepeatedNgrams, NotEnglish, Unfinished)
}
RULE_KINDS[IgnoresImage.kind] = IgnoresImage

DEFAULT_RULES: list[dict[str, Any]] = [
    {"name": "failure_phrase", "kind": "phrases"},
    {"name": "too_short", "min_words": 20},
    {"name": "too_long", "max_words": 500},
    {"name": "repeated_sentences", "max_rate": 0.0},
    {"name": "repeated_ngrams", "n": 4, "max_rate": 0.3},
    {"name": "not_english"},
    {"name": "unfinished"},
    {"name": "ignores_image", "max_images": 3},
]
"""Used when a config lists no rules."""


def parse_rules(items: Sequence[dict[str, Any]] | None, where: str = "rules") -> list[Rule]:
    """Rule objects from config mappings; a bad one is a ValueError naming its index and key."""
    rules: list[Rule] = []
    for i, item in enumerate(items or DEFAULT_RULES):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"{where}[{i}]: a rule is a mapping with a 'name', got {item!r}")
        params = dict(item)
        name = params.pop("name")
        kind = params.pop("kind", name)
        cls = RULE_KINDS.get(kind)
        if cls is None:
            raise ValueError(f"{where}[{i}] ({name}): unknown kind {kind!r}; known: {sorted(RULE_KINDS)}")
        known = {f.name for f in fields(cls)} - {"name", "counts"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{where}[{i}] ({name}): unknown parameter(s) {unknown}; {kind} takes {sorted(known)}")
        if "phrases" in params:
            phrases = params["phrases"]
            if isinstance(phrases, str) or not all(isinstance(x, str) for x in phrases):
                raise ValueError(f"{where}[{i}] ({name}): phrases is a list of strings, got {phrases!r}")
            params["phrases"] = tuple(phrases)
        rules.append(cls(name=name, **params))
    if len({r.name for r in rules}) != len(rules):
        raise ValueError(f"{where}: rule names must be unique, got {[r.name for r in rules]}")
    return rules


def apply_rules(rules: Sequence[Rule], text: str) -> tuple[str | None, dict[str, str]]:
    """(the first rule that drops ``text`` or None, every matching rule's reason)."""
    matched = {r.name: why for r in rules if (why := r.check(text)) is not None}
    return next(iter(matched), None), matched


def rule_table(dropped: Counter, rules: Sequence[Rule], total: int) -> str:
    """Markdown: how many records each rule removed (by the first rule that matched)."""
    lines = ["| rule | kind | removed |", "|---|---|---|"]
    lines += [f"| {r.name} | {r.kind} | {dropped.get(r.name, 0)} |" for r in rules]
    names = {r.name for r in rules}
    lines += [f"| {name} | (not in the config now) | {n} |" for name, n in sorted(dropped.items()) if name not in names]
    kept = total - sum(dropped.values())
    lines += [f"| **kept** | | **{kept}** of {total} |"]
    return "\n".join(lines)


__all__ = [
    "DEFAULT_RULES",
    "FAILURE_PHRASES",
    "RULE_KINDS",
    "IgnoresImage",
    "NotEnglish",
    "Phrases",
    "RepeatedNgrams",
    "RepeatedSentences",
    "Rule",
    "TooLong",
    "TooShort",
    "Unfinished",
    "apply_rules",
    "parse_rules",
    "rule_table",
]
