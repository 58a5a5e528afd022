"""Open-ended VQA: VQAv2, TextVQA, VizWiz (soft accuracy over 10 human answers) and GQA (exact match).

Answers are normalised as the official VQA evaluation (EvalAI's answer processor, which
LLaVA's TextVQA evaluator also uses) does, to both the prediction and every human answer:
lower case; punctuation dropped or turned into a space; a period removed unless it is a decimal
point; number words "none", "zero" .. "ten" -> digits; articles a / an / the dropped; missing
apostrophes of contractions restored ("dont" -> "don't"). Accuracy of an answer is
min(#humans who gave it / 3, 1), averaged over the 10 subsets of 9 of the 10 humans.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmalign.evaluate.runner import SHORT_ANSWER, Sample, Task, read_json, with_suffix

log = logging.getLogger(__name__)

NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_CANONICAL_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll "
    "somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've wasn't we'd've we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's "
    "won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
)


def _contractions() -> dict[str, str]:
    """A contraction written with one of its apostrophes left out -> the contraction. Forms
    whose short spelling is a word of its own (its, well, ill, wed, shed, lets, shell) are not
    contractions here, as in the official table, which also holds the few entries below."""
    table: dict[str, str] = {}
    for c in _CANONICAL_CONTRACTIONS.split():
        spots = [i for i, ch in enumerate(c) if ch == "'"]
        for i in spots:
            table[c[:i] + c[i + 1 :]] = c
    table.update({"twas": "'twas", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at"})
    return table


CONTRACTIONS = _contractions()
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(,)+(?=\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official (quirky) pattern: any '.' not before a digit


def normalize_answer(text: str) -> str:
    """The VQA / EvalAI answer normalisation (see the module docstring)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original = text
    for p in PUNCTUATION:  # dropped when spaced as punctuation (or digits had commas), else a word break
        if p + " " in original or " " + p in original or _COMMA_BETWEEN_DIGITS.search(original):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    out = [NUMBERS.get(w, w) for w in text.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in out if w not in ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Soft accuracy: mean over leave-one-out subsets of min(matches / 3, 1), both sides normalised."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    matches = sum(g == pred for g in gts)
    # leaving out a matching answer leaves matches - 1 others, leaving out another leaves matches
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def exact_match(prediction: str, answer: str) -> float:
    """GQA: the answer as LLaVA submits it (lower case, trailing period dropped) equals the truth."""
    return float(prediction.strip().rstrip(".").lower() == answer.strip().lower())


def says_unanswerable(prediction: str) -> bool:
    """The answer, normalised, is "unanswerable" (VizWiz's answer for questions that cannot be
    answered). Not "contains": a sentence about unanswerability is scored as it stands."""
    return normalize_answer(prediction) == "unanswerable"


# ---------------------------------------------------------------------------------------------
# files in each benchmark's published layout


def _opener(path: Path) -> Callable:
    def open_image():
        from PIL import Image

        return Image.open(path)

    return open_image


def _samples(
    path: Path, rows: list[tuple[Any, Callable[[], tuple[str, str, Path, dict]]]], prompt_suffix: str, limit: int | None
) -> list[Sample]:
    """Build samples from (record id, thunk -> (sample id, question, image path, truth)); a
    record missing a field is logged with its file and id, counted and skipped."""
    out, bad = [], 0
    for rid, make in rows:
        try:
            sid, question, image, truth = make()
        except (KeyError, TypeError, IndexError) as e:
            bad += 1
            log.warning("%s: record %s skipped, missing field %s", path, rid, e)
            continue
        out.append(Sample(str(sid), with_suffix(question, prompt_suffix), _opener(image), truth, max_new_tokens=16))
        if limit and len(out) >= limit:
            break
    if bad:
        log.warning("%s: %d bad record(s) skipped", path, bad)
    return out


def load_vqav2(data: Path | None, images: Path | None, options: dict[str, Any]) -> list[Sample]:
    """`data`: `v2_OpenEnded_mscoco_{split}_questions.json`; its `v2_mscoco_{split}_annotations.json`
    beside it; images `COCO_{split}_{image_id:012d}.jpg` in `images` (default: `{split}/` beside)."""
    if data is None:
        raise ValueError("--task vqav2 needs --data v2_OpenEnded_mscoco_SPLIT_questions.json")
    m = re.search(r"mscoco_(\w+?)_questions", data.name)
    if not m:
        raise ValueError(f"{data}: expected a VQAv2 questions file named v2_OpenEnded_mscoco_SPLIT_questions.json")
    split = m[1]
    ann_path = data.parent / f"v2_mscoco_{split}_annotations.json"
    answers = {a["question_id"]: a for a in read_json(ann_path)["annotations"]}
    folder = images or data.parent / split

    def row(q):
        a = answers[q["question_id"]]
        return (
            q["question_id"],
            q["question"],
            folder / f"COCO_{split}_{q['image_id']:012d}.jpg",
            {"answers": [x["answer"] for x in a["answers"]], "answer_type": a.get("answer_type", "all")},
        )

    qs = read_json(data)["questions"]
    return _samples(data, [(q.get("question_id"), lambda q=q: row(q)) for q in qs], SHORT_ANSWER, options.get("limit"))


def load_gqa(data: Path | None, images: Path | None, options: dict[str, Any]) -> list[Sample]:
    """`data`: GQA's `testdev_balanced_questions.json` ({question id: {imageId, question, answer}});
    images `{imageId}.jpg` (default: `images/` beside)."""
    if data is None:
        raise ValueError("--task gqa needs --data testdev_balanced_questions.json")
    folder = images or data.parent / "images"

    def row(qid, q):
        return qid, q["question"], folder / f"{q['imageId']}.jpg", {"answer": q["answer"]}

    qs = read_json(data)
    return _samples(data, [(k, lambda k=k, q=q: row(k, q)) for k, q in qs.items()], SHORT_ANSWER, options.get("limit"))


VIZWIZ_SUFFIX = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER


def load_vizwiz(data: Path | None, images: Path | None, options: dict[str, Any]) -> list[Sample]:
    """`data`: VizWiz `val.json` (a list of {image, question, answers: [{answer}], answerable,
    answer_type}); images in `images` (default: `val/` beside)."""
    if data is None:
        raise ValueError("--task vizwiz needs --data val.json")
    folder = images or data.parent / "val"

    def row(q):
        truth = {
            "answers": [a["answer"] for a in q["answers"]],
            "answerable": int(q.get("answerable", 1)),
            "answer_type": q.get("answer_type", "all"),
        }
        return q["image"], q["question"], folder / q["image"], truth

    qs = read_json(data)
    return _samples(data, [(q.get("image"), lambda q=q: row(q)) for q in qs], VIZWIZ_SUFFIX, options.get("limit"))


def load_textvqa(data: Path | None, images: Path | None, options: dict[str, Any]) -> list[Sample]:
    """`data`: `TextVQA_0.5.1_val.json` ({"data": [{question_id, image_id, question, answers}]});
    images `{image_id}.jpg` (default: `train_images/` beside; the val images live there)."""
    if data is None:
        raise ValueError("--task textvqa needs --data TextVQA_0.5.1_val.json")
    folder = images or data.parent / "train_images"

    def row(q):
        return q["question_id"], q["question"], folder / f"{q['image_id']}.jpg", {"answers": list(q["answers"])}

    qs = read_json(data)["data"]
    return _samples(data, [(q.get("question_id"), lambda q=q: row(q)) for q in qs], SHORT_ANSWER, options.get("limit"))


# ---------------------------------------------------------------------------------------------
# scoring


def _by(records: list[dict[str, Any]], key: str, scores: list[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for r, s in zip(records, scores):
        groups.setdefault(str(r["truth"].get(key, "all")), []).append(s)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def score_soft(records: list[dict[str, Any]]) -> dict[str, Any]:
    scores = [vqa_accuracy(r["prediction"], r["truth"]["answers"]) for r in records]
    return {
        "accuracy": sum(scores) / len(scores) if scores else 0.0,
        "n": len(scores),
        "by_answer_type": _by(records, "answer_type", scores),
    }


def score_vizwiz(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Soft accuracy of the normalised answer as it stands, as lmms-eval's `vizwiz_vqa` and
    LLaVA's submission script score it (an empty answer or one that merely contains
    "unanswerable" is not that answer), plus how often the model answers "unanswerable" and how
    many truly unanswerable questions it flags."""
    said = [says_unanswerable(r["prediction"]) for r in records]
    truly = [not r["truth"]["answerable"] for r in records]
    return score_soft(records) | {
        "unanswerable": {
            "said_unanswerable_rate": sum(said) / len(records) if records else 0.0,
            "recall": sum(s and t for s, t in zip(said, truly)) / sum(truly) if any(truly) else 0.0,
        }
    }


def score_exact(records: list[dict[str, Any]]) -> dict[str, Any]:
    scores = [exact_match(r["prediction"], r["truth"]["answer"]) for r in records]
    return {"accuracy": sum(scores) / len(scores) if scores else 0.0, "n": len(scores)}


def _rows_soft(metrics: dict[str, Any]) -> list[tuple[str, tuple[str, ...], str]]:
    rows = [("accuracy", ("accuracy",), "{:.1%}")]
    rows += [(f"accuracy, {t}", ("by_answer_type", t), "{:.1%}") for t in metrics.get("by_answer_type", {})]
    if "unanswerable" in metrics:
        rows += [
            ("says unanswerable", ("unanswerable", "said_unanswerable_rate"), "{:.1%}"),
            ("unanswerable recall", ("unanswerable", "recall"), "{:.1%}"),
        ]
    return rows


VQAV2 = Task("vqav2", load_vqav2, score_soft, _rows_soft, "VQAv2 soft accuracy (official normalisation)")
TEXTVQA = Task("textvqa", load_textvqa, score_soft, _rows_soft, "TextVQA soft accuracy")
VIZWIZ = Task("vizwiz", load_vizwiz, score_vizwiz, _rows_soft, "VizWiz soft accuracy, unanswerable handling")
GQA = Task("gqa", load_gqa, score_exact, lambda m: [("accuracy", ("accuracy",), "{:.1%}")], "GQA exact match")
