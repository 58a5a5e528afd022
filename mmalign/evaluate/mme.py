"""MME (Fu et al., 2023): yes / no questions, two per image (one true, one false), 14 sub-tasks.

Layout of the released `MME_Benchmark_release_version/`: one folder per sub-task; either
`images/` + `questions_answers_YN/` (artwork, celebrity, landmark, posters, scene) or images
and `.txt` files side by side. Each `.txt` holds `question<TAB>Yes|No` lines for the image of
the same stem; the questions already end with "Please answer yes or no.".

Per sub-task: accuracy (questions right) and accuracy+ (images with both questions right),
both in percent; score = accuracy + accuracy+ (max 200). Perception and cognition totals are
the sums over their sub-tasks. Answers parse as MME's tool (`eval_tool/calculation.py`) does:
lower-cased, "yes" / "no" exactly, else by "yes" / "no" in the first 4 characters, else "other"
(wrong). Our own generations are stripped first (a leading space is the tokenizer's, not the
model's answer); a results folder in the tool's own format (`read_results_dir`) is scored
exactly as the tool scores it, unstripped ("  yes" is "other" there).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmalign.evaluate.runner import YES_NO, Sample, Task, with_suffix

log = logging.getLogger(__name__)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def mme_answer(text: str, strip: bool = True) -> str:
    """MME's parsing: "yes", "no" or "other". `strip=False` is the tool's own, character for
    character (it reads the answer with its line's newline, which changes nothing)."""
    t = text.lower()
    if strip:
        t = t.strip()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(question file, image) pairs of one sub-task folder, in either released layout."""
    qa_dir, img_dir = (folder / "questions_answers_YN", folder / "images")
    if not qa_dir.is_dir():
        qa_dir = img_dir = folder
    out = []
    for txt in sorted(qa_dir.glob("*.txt")):
        image = next((img_dir / (txt.stem + s) for s in IMAGE_SUFFIXES if (img_dir / (txt.stem + s)).exists()), None)
        if image is None:
            log.warning("%s: no image %s.{jpg,png} in %s; skipped", txt, txt.stem, img_dir)
            continue
        out.append((txt, image))
    return out


def load_mme(data: Path | None, images: Path | None, options: dict[str, Any]) -> list[Sample]:
    if data is None or not data.is_dir():
        raise ValueError(f"--task mme needs --data MME_Benchmark_release_version (a folder); got {data}")
    from PIL import Image

    samples = []
    subtasks = [t for t in (*PERCEPTION, *COGNITION) if (data / t).is_dir()]
    if not subtasks:
        raise FileNotFoundError(f"{data}: none of MME's sub-task folders ({', '.join(PERCEPTION + COGNITION)})")
    for task in subtasks:
        n = 0
        for txt, image in _pairs(data / task):
            for k, line in enumerate(x for x in txt.read_text().splitlines() if x.strip()):
                parts = line.rsplit("\t", 1)
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    log.warning("%s line %d: not 'question<TAB>Yes|No'; skipped", txt, k + 1)
                    continue
                samples.append(
                    Sample(
                        f"{task}/{txt.stem}/{k}",
                        with_suffix(parts[0], YES_NO),
                        lambda p=image: Image.open(p),
                        {"subtask": task, "image": txt.stem, "answer": parts[1].strip().lower()},
                        max_new_tokens=16,
                    )
                )
            n += 1
            if options.get("limit") and n >= options["limit"]:  # images per sub-task
                break
    return samples


def read_results_dir(folder: Path) -> list[dict[str, Any]]:
    """Records from a results folder in MME's tool layout: `{subtask}.txt`, one line per question,
    `image<TAB>question<TAB>Yes|No<TAB>prediction`, an image's two questions on consecutive lines
    (the tool pairs lines two by two). The records are marked to be parsed as the tool parses."""
    records = []
    for task in (*PERCEPTION, *COGNITION):
        path = folder / f"{task}.txt"
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        if len(lines) % 2:
            raise ValueError(f"{path}: {len(lines)} lines; MME's tool needs two per image")
        for n, line in enumerate(lines):
            parts = line.split("\t")
            if len(parts) != 4 or parts[2].lower() not in ("yes", "no"):
                raise ValueError(f"{path} line {n + 1}: not 'image<TAB>question<TAB>Yes|No<TAB>prediction'")
            truth = {"subtask": task, "image": f"{n // 2}:{parts[0]}", "answer": parts[2].lower(), "tool_parse": True}
            records.append({"id": f"{task}/{n}", "prompt": parts[1], "prediction": parts[3], "truth": truth})
    if not records:
        raise FileNotFoundError(f"{folder}: no MME results file ({', '.join(PERCEPTION + COGNITION)}).txt")
    return records


def score_mme(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_task: dict[str, dict[str, list[bool]]] = {}
    for r in records:
        t = r["truth"]
        answer = mme_answer(r["prediction"], strip=not t.get("tool_parse", False))
        by_task.setdefault(t["subtask"], {}).setdefault(t["image"], []).append(answer == t["answer"])
    out: dict[str, Any] = {"subtasks": {}}
    for task, images in by_task.items():
        answers = [ok for oks in images.values() for ok in oks]
        acc = 100 * sum(answers) / len(answers)
        acc_plus = 100 * sum(all(oks) for oks in images.values()) / len(images)
        out["subtasks"][task] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus, "n": len(answers)}
    for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
        scores = [out["subtasks"][t]["score"] for t in names if t in out["subtasks"]]
        if scores:
            out[group] = sum(scores)
    return out


def rows_mme(metrics: dict[str, Any]) -> list[tuple[str, tuple[str, ...], str]]:
    rows = [(f"{g} total", (g,), "{:.1f}") for g in ("perception", "cognition") if g in metrics]
    for task in metrics.get("subtasks", {}):
        rows += [
            (f"{task} {k.replace('_plus', '+')}", ("subtasks", task, k), "{:.1f}")
            for k in ("score", "accuracy", "accuracy_plus")
        ]
    return rows


TASK = Task("mme", load_mme, score_mme, rows_mme, "MME yes / no: accuracy, accuracy+, perception and cognition totals")
