"""POPE (Li et al., 2023): "Is there a <object> in the image?" with balanced yes / no answers.

Three splits differ in how the absent objects are drawn: random, popular (frequent COCO
objects), adversarial (objects that co-occur with the present ones). Files are POPE's own:
one JSON object per line, `{"question_id", "image", "text", "label"}`. Answers are parsed as
POPE's evaluation script does: keep the first sentence, and it is "no" if it contains the word
"no", "No" or "not", otherwise "yes". Yes is the positive class.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmalign.evaluate.runner import SHORT_ANSWER, Sample, Task, with_suffix

log = logging.getLogger(__name__)
SPLITS = ("random", "popular", "adversarial")


def pope_answer(text: str) -> str:
    """POPE's parsing: first sentence, commas dropped, split on spaces; no / No / not -> "no"."""
    first = text.split(".")[0].replace(",", "")
    return "no" if {"no", "No", "not"} & set(first.split(" ")) else "yes"


def yes_no_metrics(pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """(prediction, truth) pairs, "yes" positive; anything but "yes" predicts no. Empty
    denominators give 0 rather than an error."""
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t != "yes" for p, t in pairs)
    fn = sum(p != "yes" and t == "yes" for p, t in pairs)
    tn = len(pairs) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs) if pairs else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / len(pairs) if pairs else 0.0,
    }


def _split_files(data: Path) -> dict[str, Path]:
    if data.is_file():
        split = next((s for s in SPLITS if s in data.name), data.stem)
        return {split: data}
    found = {s: p for s in SPLITS for p in sorted(data.glob(f"*pope_{s}*.json*"))[:1]}
    if not found:
        raise FileNotFoundError(f"{data}: no POPE files (coco_pope_random.json, ..._popular, ..._adversarial)")
    return found


def load_pope(data: Path | None, images: Path | None, options: dict[str, Any]) -> list[Sample]:
    """`data`: one POPE file or a folder with `coco_pope_{random,popular,adversarial}.json`;
    `images`: the COCO val2014 folder (default: `val2014` beside the POPE files)."""
    if data is None:
        raise ValueError("--task pope needs --data POPE_FILE_OR_FOLDER")
    from PIL import Image

    samples = []
    for split, path in _split_files(data).items():
        folder = images or path.parent / "val2014"
        split_samples = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                qid, image, question, label = rec["question_id"], rec["image"], rec["text"], rec["label"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                log.warning("%s line %d: skipped, not a POPE record (%s)", path, n, e)
                continue
            split_samples.append(
                Sample(
                    f"{split}/{qid}",
                    with_suffix(question, SHORT_ANSWER),
                    lambda p=folder / image: Image.open(p),
                    {"split": split, "label": label.strip().lower()},
                    max_new_tokens=16,
                )
            )
        samples += split_samples[: options.get("limit") or None]
    return samples


def score_pope(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in dict.fromkeys(r["truth"]["split"] for r in records):
        pairs = [(pope_answer(r["prediction"]), r["truth"]["label"]) for r in records if r["truth"]["split"] == split]
        out[split] = {"n": len(pairs), **yes_no_metrics(pairs)}
    if len(out) > 1:
        out["average"] = {
            k: sum(m[k] for m in out.values()) / len(out)
            for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")
        }
    return out


def rows_pope(metrics: dict[str, Any]) -> list[tuple[str, tuple[str, ...], str]]:
    rows = []
    for split in metrics:
        if isinstance(metrics[split], dict):
            rows += [(f"{split}: {k}", (split, k), "{:.3f}") for k in ("accuracy", "f1", "precision", "recall")]
            rows.append((f"{split}: yes-ratio", (split, "yes_ratio"), "{:.2f}"))
    return rows


TASK = Task("pope", load_pope, score_pope, rows_pope, "POPE object probing: accuracy, precision, recall, F1, yes-ratio")
