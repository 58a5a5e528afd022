"""Multiple choice, MMBench style: circular evaluation over rotated options.

MMBench's TSV has one question per row: `index, question, hint, A, B, C, D[, E...], answer,
category, image` (image base64-encoded, or the index of an earlier row with the same image).
Each question is asked once per rotation of its options (A..D -> B..D,A -> ...); under circular
evaluation it counts as right only if every rotation is answered right. The prompt is LLaVA's:
hint, question, one "X. option" line per option, then "Answer with the option's letter from the
given choices directly."
"""

from __future__ import annotations

import base64
import csv
import io
import logging
import re
import sys
from pathlib import Path
from typing import Any

from mmalign.evaluate.runner import OPTION_LETTER, Sample, Task

log = logging.getLogger(__name__)
LETTERS = "ABCDEFGHI"


def _missing(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def build_prompt(question: str, hint: str | None, options: list[str]) -> str:
    text = question if _missing(hint) else f"{hint.strip()}\n{question}"
    text += "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{text}\n{OPTION_LETTER}"


def parse_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter an answer picks: a leading letter ("B", "B.", "(B) ..."), else exactly
    one standalone letter among the options ("A" / "I" before a lower-case word are the article
    and the pronoun, as in "A dog"), else exactly one option's text; None otherwise."""
    t = text.strip()
    m = re.match(r"^\(?([A-I])(?:[).:]|\s*$)", t)
    if m and m[1] in options:
        return m[1]
    letters = {
        m[1]
        for m in re.finditer(r"\b([A-I])\b", t)
        if m[1] in options and not (m[1] in "AI" and re.match(r" [a-z]", t[m.end() :]))
    }
    if len(letters) == 1:
        return letters.pop()
    hits = [k for k, v in options.items() if v.strip() and v.strip().lower() in t.lower()]
    return hits[0] if len(hits) == 1 else None


def load_mmbench(data: Path | None, images: Path | None, options: dict[str, Any]) -> list[Sample]:
    """`data`: an MMBench TSV (e.g. `mmbench_dev_20230712.tsv`). Rows without an answer (test
    split) are still asked; scoring skips them."""
    if data is None or not data.is_file():
        raise ValueError(f"--task mmbench needs --data MMBENCH.tsv; got {data}")
    from PIL import Image

    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with open(data, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and not {"index", "question", "A", "B"} <= set(rows[0]):
        raise ValueError(f"{data}: not an MMBench TSV (need columns index, question, A, B, ...; got {sorted(rows[0])})")
    image_of = {r["index"]: r.get("image", "") for r in rows}
    samples: list[Sample] = []
    circular = options.get("circular", True)
    for n, row in enumerate(rows, 2):
        opts = [row[x] for x in LETTERS if x in row and not _missing(row[x])]
        img = row.get("image", "")
        if len(img) < 64 and img in image_of:  # a reference to another row's image
            img = image_of[img]
        if len(opts) < 2 or _missing(row.get("question")) or _missing(img):
            log.warning(
                "%s line %d (index %s): skipped, needs a question, an image and >= 2 options", data, n, row.get("index")
            )
            continue
        answer = None if _missing(row.get("answer")) else row["answer"].strip()
        for r in range(len(opts) if circular else 1):
            rotated = opts[r:] + opts[:r]
            letter = None if answer is None else LETTERS[(LETTERS.index(answer) - r) % len(opts)]
            truth = {
                "index": row["index"],
                "rotation": r,
                "answer": letter,
                "category": row.get("category", ""),
                "options": {LETTERS[i]: o for i, o in enumerate(rotated)},
            }
            samples.append(
                Sample(
                    f"{row['index']}/{r}",
                    build_prompt(row["question"], row.get("hint"), rotated),
                    lambda b=img: Image.open(io.BytesIO(base64.b64decode(b))),
                    truth,
                    max_new_tokens=8,
                )
            )
        if options.get("limit") and len({s.truth["index"] for s in samples}) >= options["limit"]:
            break
    return samples


def score_mc(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_q: dict[str, list[tuple[int, bool]]] = {}
    category: dict[str, str] = {}
    for r in records:
        t = r["truth"]
        if t["answer"] is None:
            continue
        by_q.setdefault(t["index"], []).append(
            (t["rotation"], parse_choice(r["prediction"], t["options"]) == t["answer"])
        )
        category[t["index"]] = t.get("category", "")
    circ = {q: all(ok for _, ok in v) for q, v in by_q.items()}
    first = {q: next((ok for rot, ok in v if rot == 0), False) for q, v in by_q.items()}
    cats: dict[str, list[bool]] = {}
    for q, ok in circ.items():
        cats.setdefault(category[q] or "all", []).append(ok)
    n = len(by_q)
    return {
        "circular_accuracy": sum(circ.values()) / n if n else 0.0,
        "single_pass_accuracy": sum(first.values()) / n if n else 0.0,
        "n_questions": n,
        "by_category": {c: sum(v) / len(v) for c, v in sorted(cats.items())},
    }


def rows_mc(metrics: dict[str, Any]) -> list[tuple[str, tuple[str, ...], str]]:
    rows = [
        ("circular accuracy", ("circular_accuracy",), "{:.1%}"),
        ("single-pass accuracy", ("single_pass_accuracy",), "{:.1%}"),
    ]
    return rows + [(f"circular, {c}", ("by_category", c), "{:.1%}") for c in metrics.get("by_category", {})]


TASK = Task("mmbench", load_mmbench, score_mc, rows_mc, "MMBench multiple choice with circular evaluation")
