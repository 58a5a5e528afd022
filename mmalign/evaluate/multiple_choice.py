"""Multiple choice, MMBench style: circular evaluation over the released rotated copies.

MMBench's TSV has one row per question *as asked*: `index, question, hint, A, B, C, D[, E...],
answer, category, image` (image base64-encoded, or the index of an earlier row with the same
image). The released files already hold the circular copies: a question with options A..D
comes back as rows `index + k * 1e6` with its options rotated and its answer letter moved, and
`index % 1e6` names the question (VLMEvalKit's `g_index`). Rows are read as released: every row
is asked once, a question counts under circular evaluation only if all its rows are right, and
the row with `index == g_index` is its single-pass answer. The prompt is LLaVA's: hint,
question, one "X. option" line per option, then "Answer with the option's letter from the
given choices directly." Answers are matched as VLMEvalKit's exact matching (`can_infer`) does.
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
CIRCULAR_OFFSET = 1_000_000  # copy k of question q has index q + k * 1e6


def _missing(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def build_prompt(question: str, hint: str | None, options: list[str]) -> str:
    text = question if _missing(hint) else f"{hint.strip()}\n{question}"
    text += "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{text}\n{OPTION_LETTER}"


# VLMEvalKit `vlmeval/utils/matching_util.py`: what `can_infer_option` treats as separators, as
# refusals (its "Z", no option) and as an explicit verdict
_SEPARATORS = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_NO_OPTION = "Z"


def _option_letter(text: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit's `can_infer_option`: exactly one option letter standing as a word among the
    last 4 words ("A dog" is A), "Z" for a refusal or a lone "Z", else "answer is X"."""
    if "Failed to obtain answer via API" in text:
        return None
    if any(r in text for r in _REFUSALS):
        return _NO_OPTION
    words = text.translate(_SEPARATORS).split()
    named = [k for k in options if k in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and _NO_OPTION in words:
        return _NO_OPTION
    m = _ANSWER_IS.search(text)
    return m[1].upper() if m and m[1].upper() in options else None


def _option_text(text: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit's `can_infer_text`: exactly one option's text inside a short enough answer."""
    t = text.lower()
    if len(t) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    hits = [k for k, v in options.items() if str(v).lower() in t]
    return hits[0] if len(hits) == 1 else None


def parse_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter an answer picks, as VLMEvalKit's exact matching (`can_infer`) reads it:
    a letter first, else an option's text; None when nothing matches or the model refuses."""
    letter = _option_letter(str(text), options) or _option_text(str(text), options)
    return None if letter == _NO_OPTION else letter


def _image_of(rows: list[dict[str, str]]) -> dict[str, str]:
    return {r["index"]: r.get("image", "") for r in rows}


def load_mmbench(data: Path | None, images: Path | None, options: dict[str, Any]) -> list[Sample]:
    """`data`: an MMBench TSV as released (e.g. `mmbench_dev_20230712.tsv`), every row asked once.
    `limit` N: the rows of the first N questions; `circular=False`: only each question's main
    row. Rows without an answer (test split) are still asked; scoring skips them."""
    if data is None or not data.is_file():
        raise ValueError(f"--task mmbench needs --data MMBENCH.tsv; got {data}")
    from PIL import Image

    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with open(data, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and not {"index", "question", "A", "B"} <= set(rows[0]):
        raise ValueError(f"{data}: not an MMBench TSV (need columns index, question, A, B, ...; got {sorted(rows[0])})")
    image_of, samples, groups = _image_of(rows), [], []
    for n, row in enumerate(rows, 2):
        index = int(float(row["index"]))
        group = index % CIRCULAR_OFFSET
        if (options.get("circular") is False and index != group) or (
            options.get("limit") and group not in groups and len(groups) >= options["limit"]
        ):
            continue
        opts = {x: row[x] for x in LETTERS if x in row and not _missing(row[x])}
        img = row.get("image", "")
        if len(img) < 64 and img in image_of:  # a reference to another row's image
            img = image_of[img]
        if len(opts) < 2 or _missing(row.get("question")) or _missing(img):
            log.warning("%s line %d (index %s): skipped, needs a question, an image and >= 2 options", data, n, index)
            continue
        groups += [group] if group not in groups else []
        truth = {
            "index": index,
            "group": group,
            "answer": None if _missing(row.get("answer")) else row["answer"].strip(),
            "category": row.get("category", ""),
            "options": opts,
        }
        samples.append(
            Sample(
                str(index),
                build_prompt(row["question"], row.get("hint"), list(opts.values())),
                lambda b=img: Image.open(io.BytesIO(base64.b64decode(b))),
                truth,
                max_new_tokens=8,
            )
        )
    return samples


def score_mc(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per question (`group`): circular = every released row right; single pass = the main row
    (`index == group`) right. A group without its main row is not scored, as in VLMEvalKit."""
    by_q: dict[int, dict[int, bool]] = {}
    for r in records:
        t = r["truth"]
        if t["answer"] is not None:
            by_q.setdefault(t["group"], {})[t["index"]] = parse_choice(r["prediction"], t["options"]) == t["answer"]
    category = {
        r["truth"]["group"]: r["truth"].get("category", "")
        for r in records
        if r["truth"]["index"] == r["truth"]["group"]
    }
    by_q = {q: rows for q, rows in by_q.items() if q in rows}
    circ = {q: all(rows.values()) for q, rows in by_q.items()}
    cats: dict[str, list[bool]] = {}
    for q, ok in circ.items():
        cats.setdefault(category[q] or "all", []).append(ok)
    n = len(by_q)
    return {
        "circular_accuracy": sum(circ.values()) / n if n else 0.0,
        "single_pass_accuracy": sum(rows[q] for q, rows in by_q.items()) / n if n else 0.0,
        "n_questions": n,
        "n_rows": sum(map(len, by_q.values())),
        "by_category": {c: sum(v) / len(v) for c, v in sorted(cats.items())},
    }


def rows_mc(metrics: dict[str, Any]) -> list[tuple[str, tuple[str, ...], str]]:
    rows = [
        ("circular accuracy", ("circular_accuracy",), "{:.1%}"),
        ("single-pass accuracy", ("single_pass_accuracy",), "{:.1%}"),
    ]
    return rows + [(f"circular, {c}", ("by_category", c), "{:.1%}") for c in metrics.get("by_category", {})]


TASK = Task("mmbench", load_mmbench, score_mc, rows_mc, "MMBench multiple choice with circular evaluation")
