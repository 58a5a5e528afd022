"""One evaluation loop for every benchmark: batched greedy answers, saved as they come, then scored.

A benchmark is a `Task`: it turns local files in the benchmark's published layout into
`Sample`s (an id, the user's question, a lazy image, and the ground truth its scorer needs)
and scores the saved records. The loop appends one JSON line per answered sample to
`predictions.jsonl`, so an interrupted run resumes where it stopped and a finished run can be
re-scored without a model; the records carry their own ground truth, so scoring reads nothing
else. Evaluation is greedy, as in the papers.

`generate` is the only place the evaluation code calls the chat engine.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from tqdm import tqdm

if TYPE_CHECKING:
    from mmalign.model.bundle import LoadedModel

log = logging.getLogger(__name__)

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5 / ShareGPT4V suffix for short-answer VQA, POPE, GQA, VizWiz, TextVQA."""
YES_NO = "Please answer yes or no."
"""MME's suffix (already in its question files)."""
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
"""MMBench suffix in LLaVA-1.5 / ShareGPT4V evaluation."""


def with_suffix(question: str, suffix: str) -> str:
    """`question` + newline + `suffix` (LLaVA's layout), unless the question already ends with it."""
    question = question.strip()
    return question if question.endswith(suffix) else f"{question}\n{suffix}"


@dataclass
class Sample:
    """One prompt to answer. `truth` is JSON-serialisable and saved beside the prediction."""

    id: str
    prompt: str  # the user's text, without the image marker
    image: Callable[[], Image.Image] | None  # lazy: opened only when the sample is generated
    truth: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 32


@dataclass
class Task:
    """A benchmark: how to read its files, score saved records, and lay out its report rows.

    `load(data, images, options)` -> samples; `score(records)` -> metrics (nested dicts of
    numbers); `rows(metrics)` -> report rows `(label, path into metrics, format)`.
    """

    name: str
    load: Callable[[Path | None, Path | None, dict[str, Any]], list[Sample]]
    score: Callable[[list[dict[str, Any]]], dict[str, Any]]
    rows: Callable[[dict[str, Any]], list[tuple[str, tuple[str, ...], str]]]
    description: str = ""
    notes: Callable[[dict[str, dict[str, Any]]], list[str]] | None = None  # report text read off the metrics


# id -> "module:attribute"; imported on use so `mmalign eval --task pope` loads only POPE
TASKS: dict[str, str] = {
    "toy": "mmalign.evaluate.toy:TASK",
    "chair": "mmalign.evaluate.chair:TASK",
    "pope": "mmalign.evaluate.pope:TASK",
    "vqav2": "mmalign.evaluate.vqa:VQAV2",
    "gqa": "mmalign.evaluate.vqa:GQA",
    "vizwiz": "mmalign.evaluate.vqa:VIZWIZ",
    "textvqa": "mmalign.evaluate.vqa:TEXTVQA",
    "mme": "mmalign.evaluate.mme:TASK",
    "mmbench": "mmalign.evaluate.multiple_choice:TASK",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown evaluation task {name!r}; known: {sorted(TASKS)}")
    module, attr = TASKS[name].split(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------------------------------
# generation: the one dependency on the chat engine


def generate(
    loaded: LoadedModel,
    items: Sequence[tuple[Image.Image | None, str]],
    *,
    batch_size: int,
    **gen: Any,
) -> list[str]:
    """Greedy answers to (image, question) pairs, one user turn each, with the system message
    the recipe trains with (`training_system`: none for MiniGPT-4, LLaVA's for vicuna_v1),
    left-padded batches."""
    from mmalign.chat.generate import generate_batch
    from mmalign.prompts import training_system, user_with_image

    template = loaded.template
    turns = [
        (im, [{"role": "user", "content": user_with_image(template, q) if im is not None else q}]) for im, q in items
    ]
    return generate_batch(loaded, turns, batch_size=batch_size, system=training_system(template), **gen)


# ---------------------------------------------------------------------------------------------
# files


def read_json(path: Path) -> Any:
    """A benchmark's JSON file; a missing or broken one is named in the error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the benchmark's files in their published layout)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_predictions(path: Path, samples: Iterable[Sample] | None = None) -> dict[str, dict[str, Any]]:
    """Saved records by id. A cut-off last line (killed mid-write) or a corrupt one is counted
    and skipped: that sample is simply answered again. A record whose prompt differs from the
    sample's means the file belongs to another run: a clear error, not a silent mix."""
    if not path.exists():
        return {}
    by_id = {s.id: s for s in samples} if samples is not None else None
    done: dict[str, dict[str, Any]] = {}
    bad = 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
            rec["id"], rec["prediction"]
        except (json.JSONDecodeError, KeyError, TypeError):
            bad += 1
            log.warning("%s line %d: not a complete prediction record; it will be generated again", path, n)
            continue
        if by_id is not None:
            s = by_id.get(rec["id"])
            if s is None:
                continue  # e.g. a larger --limit earlier: not part of this run
            if rec.get("prompt") != s.prompt:
                raise ValueError(
                    f"{path} line {n}: record {rec['id']!r} was made with prompt {rec.get('prompt')!r}, this run "
                    f"asks {s.prompt!r}; use another --out folder"
                )
        done[rec["id"]] = rec
    if bad:
        log.warning("%s: %d unreadable line(s) skipped", path, bad)
    return done


def _batches(samples: list[Sample], batch_size: int) -> Iterable[list[Sample]]:
    """Consecutive chunks of samples that share a generation length."""
    chunk: list[Sample] = []
    for s in samples:
        if chunk and (len(chunk) == batch_size or s.max_new_tokens != chunk[0].max_new_tokens):
            yield chunk
            chunk = []
        chunk.append(s)
    if chunk:
        yield chunk


def _ends_without_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) != b"\n"


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    records: list[dict[str, Any]]


def run_task(
    task: Task,
    samples: list[Sample],
    out_dir: str | Path | None,
    loaded: LoadedModel | None = None,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Answer every sample not yet in `out_dir/predictions.jsonl`, then score all of them into
    `out_dir/metrics.json`. With `loaded=None` nothing is generated: a re-score of what is saved.
    With `out_dir=None` nothing is written (in-memory evaluation, e.g. inside the toy main job)."""
    path = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / "predictions.jsonl"
    done = read_predictions(path, samples) if path else {}
    todo = [s for s in samples if s.id not in done]
    skipped: list[str] = []
    if todo and loaded is not None:
        with (
            open(path, "a") if path else contextlib.nullcontext() as f,
            tqdm(
                total=len(samples),
                initial=len(samples) - len(todo),
                unit="sample",
                desc=f"eval {task.name}",
                disable=not progress,
            ) as bar,
        ):
            if f is not None and _ends_without_newline(path):
                f.write("\n")  # a line cut off by a kill stays on its own (unreadable) line
            for chunk in _batches(todo, batch_size):
                for rec in _answer(loaded, chunk, max_new_tokens, skipped):
                    if f is not None:
                        f.write(json.dumps(rec) + "\n")
                    done[rec["id"]] = rec
                if f is not None:
                    f.flush()
                bar.update(len(chunk))
    records = [done[s.id] for s in samples if s.id in done]
    metrics = task.score(records)
    metrics["n_samples"] = len(samples)
    metrics["n_answered"] = len(records)
    if skipped:
        metrics["skipped_images"] = len(skipped)
    if out_dir is not None:
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return EvalResult(metrics, records)


def _answer(loaded: LoadedModel, chunk: list[Sample], max_new_tokens: int | None, skipped: list[str]) -> list[dict]:
    """Prediction records for one batch; a sample whose image cannot be opened is logged, added
    to `skipped` and left out (it is retried by the next run)."""
    ready, images = [], []
    for s in chunk:
        try:
            images.append(s.image().convert("RGB") if s.image is not None else None)
            ready.append(s)
        except (OSError, ValueError) as e:  # missing / corrupt image: counted, skipped
            log.warning("sample %s: cannot open its image (%s); skipped", s.id, e)
            skipped.append(s.id)
    if not ready:
        return []
    answers = generate(
        loaded,
        [(im, s.prompt) for im, s in zip(images, ready)],
        batch_size=len(ready),
        max_new_tokens=max_new_tokens or chunk[0].max_new_tokens,
    )
    return [{"id": s.id, "prompt": s.prompt, "prediction": a, "truth": s.truth} for s, a in zip(ready, answers)]


# ---------------------------------------------------------------------------------------------
# the command: models x one task -> per-model predictions + metrics, one report


def parse_models(specs: Sequence[str]) -> dict[str, str]:
    """`PATH` or `NAME=PATH` (a hub id or folder) -> {name: path}; names default to the folder name."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name or spec, spec
        if name in out:
            raise ValueError(f"two models named {name!r}; name them: --model NAME=PATH")
        out[name] = path
    return out


def evaluate(
    task_name: str,
    models: dict[str, str],
    out: str | Path,
    *,
    data: str | Path | None = None,
    images: str | Path | None = None,
    options: dict[str, Any] | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    template: str | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    rescore: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate each model on one task into `out/NAME/`, then write `out/report.md` + `report.png`
    comparing them. `rescore`: load no model, score the saved predictions only."""
    from mmalign.evaluate.report import write_report

    task = get_task(task_name)
    samples = task.load(Path(data) if data else None, Path(images) if images else None, options or {})
    if not samples:
        raise ValueError(f"task {task_name!r}: no samples found in {data}")
    results: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        loaded = None
        if not rescore:
            from mmalign.model import LoadedModel

            loaded = LoadedModel.load(path, template=template, dtype=dtype, device=device)
        result = run_task(
            task,
            samples,
            Path(out) / name,
            loaded,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        results[name] = result.metrics
        del loaded
    rows = list(dict.fromkeys(r for m in results.values() for r in task.rows(m)))
    intro = [f"Task `{task.name}`: {task.description}; {len(samples)} prompts, greedy decoding.", ""]
    intro += [f"- `{name}`: `{path}`" for name, path in models.items()]
    if data:
        intro.append(f"- data: `{data}`")
    write_report(
        f"Evaluation: {task.name}", results, rows, out, intro=intro, notes=task.notes(results) if task.notes else []
    )
    return results
