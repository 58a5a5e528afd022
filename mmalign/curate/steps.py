"""The resumable steps describe -> fix -> filter: each reads the previous step's done records
and appends its own to ``<workdir>/<step>/rank<r>.jsonl`` (see ``store``).

A rerun skips done records and retries failed ones; records are dealt to ranks by their place
in a sorted order (``records[rank::world]``), so ``torchrun`` processes share a step without
talking to each other. Every step shows a progress bar (items/s, ETA) and returns a
``StepSummary``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmalign.curate.config import CurateConfig
from mmalign.curate.describe import (
    UNREADABLE_IMAGE,
    EndpointDescriber,
    ImageItem,
    LocalDescriber,
    image_items,
    list_images,
)
from mmalign.curate.endpoint import BudgetSpent, ChatEndpoint, EndpointError, run_concurrently
from mmalign.curate.filters import apply_rules, parse_rules, rule_table
from mmalign.curate.store import DONE, StepLog, archive_step, done_records, read_step

log = logging.getLogger(__name__)


@dataclass
class StepSummary:
    step: str
    done: int = 0  # finished in this run
    failed: int = 0  # failed in this run (retried by the next)
    already: int = 0  # done by an earlier run
    pending: int = 0  # not attempted (budget spent, endpoint gone)
    reasons: Counter = field(default_factory=Counter)

    def line(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common())
        return (
            f"{self.step}: {self.done} done now, {self.already} done before, {self.failed} failed"
            + (f" ({why})" if why else "")
            + (f", {self.pending} left pending" if self.pending else "")
        )


def rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    from mmalign.data.stream import rank_world as from_env

    env_rank, env_world = from_env()
    return (env_rank if rank is None else rank), (env_world if world is None else world)


def _todo(items: list[Any], state: dict[str, dict], key: Callable[[Any], str], summary: StepSummary) -> list[Any]:
    todo = [x for x in items if state.get(key(x), {}).get("status") != DONE]
    summary.already = len(items) - len(todo)
    return todo


def _bar(step: str, total: int, initial: int, unit: str) -> tqdm:
    return tqdm(total=total, initial=initial, desc=step, unit=unit, dynamic_ncols=True)


# --------------------------------------------------------------------------- describe


def run_describe(
    cfg: CurateConfig,
    describer: LocalDescriber | EndpointDescriber,
    *,
    rank: int | None = None,
    world: int | None = None,
) -> StepSummary:
    """Describe every image of ``cfg.images`` this rank owns that is not described yet."""
    if not cfg.images:
        raise ValueError("images: the config names no images to describe")
    rank, world = rank_world(rank, world)
    items = image_items(list_images(cfg.images))[rank::world]
    summary = StepSummary("describe")
    todo = _todo(items, read_step(cfg.workdir, "describe"), lambda x: x.id, summary)
    with StepLog(cfg.workdir, "describe", rank) as out, _bar("describe", len(items), summary.already, "img") as bar:
        if isinstance(describer, LocalDescriber):
            _describe_local(describer, todo, out, bar, summary, cfg.describe.batch_size)
        else:
            _describe_endpoint(describer, todo, out, bar, summary)
    log.info(summary.line())
    return summary


def _base_fields(item: ImageItem, describer: Any, prompt: str) -> dict[str, Any]:
    return {"image": str(item.path), "prompt": prompt, "model": describer.name}


def _open_or_fail(item: ImageItem, out: StepLog, summary: StepSummary, fields: dict[str, Any]) -> Any:
    try:
        return item.open()
    except UNREADABLE_IMAGE as e:
        out.failed(item.id, f"corrupt image: {e}", **fields)
        summary.failed += 1
        summary.reasons["corrupt image"] += 1
        return None


def _describe_local(describer, todo, out, bar, summary, batch_size: int) -> None:
    prompt = describer.cfg.prompt
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        ready = [(x, _open_or_fail(x, out, summary, _base_fields(x, describer, prompt))) for x in chunk]
        ready = [(x, im) for x, im in ready if im is not None]
        if ready:
            for (item, _), desc in zip(ready, describer.describe([im for _, im in ready])):
                out.done(item.id, **_base_fields(item, describer, prompt), **desc.fields())
                summary.done += 1
        bar.update(len(chunk))


def _describe_endpoint(describer: EndpointDescriber, todo, out, bar, summary) -> None:
    prompt, stop = describer.cfg.prompt, threading.Event()

    def work(item: ImageItem):
        image = item.open()
        return describer.describe_one(image)

    for item, result, error in run_concurrently(todo, work, describer.endpoint.cfg.concurrency, stop):
        fields = _base_fields(item, describer, prompt)
        if error is None:
            desc, raw = result
            out.done(item.id, **fields, **desc.fields(), raw=raw)
            summary.done += 1
        else:
            _record_failure(item.id, error, out, summary, stop, describer.endpoint, fields)
        bar.update(1)
    summary.pending = len(todo) - summary.done - summary.failed


def _record_failure(
    id_: str, error: BaseException, out: StepLog, summary: StepSummary, stop, endpoint: ChatEndpoint, fields: dict
) -> None:
    """A failed request is recorded (and retried next run); a spent budget or a lost endpoint
    stops the step, leaving what is left pending."""
    if isinstance(error, BudgetSpent):
        stop.set()
        return
    if isinstance(error, EndpointError):
        kind, raw = error.kind, error.raw
    elif isinstance(error, UNREADABLE_IMAGE):
        kind, raw = "corrupt image", None
    else:
        raise error
    out.failed(id_, str(error), **fields, **({"raw": raw} if raw is not None else {}))
    summary.failed += 1
    summary.reasons[kind] += 1
    if endpoint.unreachable.is_set():
        stop.set()


# --------------------------------------------------------------------------- fix


def fix_message(cfg: CurateConfig, paragraph: str) -> str:
    return cfg.fix.message.format(instruction=cfg.fix.instruction, paragraph=paragraph)


def run_fix(
    cfg: CurateConfig,
    fixer: ChatEndpoint | Any,
    *,
    rank: int | None = None,
    world: int | None = None,
) -> StepSummary:
    """Repair every described record not fixed yet, through an endpoint or a local text model
    (a ``LoadedModel``); an empty or malformed reply leaves the record pending."""
    rank, world = rank_world(rank, world)
    described = sorted(done_records(cfg.workdir, "describe").values(), key=lambda r: (r["image"], r["id"]))
    if not described:
        raise ValueError(f"fix: no described records in {cfg.workdir}/describe (run `mmalign curate describe` first)")
    mine = described[rank::world]
    summary = StepSummary("fix")
    todo = _todo(mine, read_step(cfg.workdir, "fix"), lambda r: r["id"], summary)
    with StepLog(cfg.workdir, "fix", rank) as out, _bar("fix", len(mine), summary.already, "rec") as bar:
        if isinstance(fixer, ChatEndpoint):
            _fix_endpoint(cfg, fixer, todo, out, bar, summary)
        else:
            _fix_local(cfg, fixer, todo, out, bar, summary)
    log.info(summary.line())
    return summary


def _fix_fields(cfg: CurateConfig, rec: dict[str, Any], model: str) -> dict[str, Any]:
    return {"image": rec["image"], "source": rec["text"], "prompt": fix_message(cfg, rec["text"]), "model": model}


def _fix_endpoint(cfg, endpoint: ChatEndpoint, todo, out, bar, summary) -> None:
    stop = threading.Event()

    def work(rec):
        return endpoint.chat([{"role": "user", "content": fix_message(cfg, rec["text"])}])

    for rec, reply, error in run_concurrently(todo, work, endpoint.cfg.concurrency, stop):
        fields = _fix_fields(cfg, rec, endpoint.where)
        if error is None and reply.finish_reason == "length":  # a cut-off paragraph is not a repair
            cap = f"endpoint.max_tokens={endpoint.cfg.max_tokens}"
            error = EndpointError("truncated reply", f"the reply stopped at {cap}; raise it", reply.raw)
        if error is None:
            out.done(rec["id"], **fields, raw=reply.raw, text=reply.text, finish_reason=reply.finish_reason)
            summary.done += 1
        else:
            _record_failure(rec["id"], error, out, summary, stop, endpoint, fields)
        bar.update(1)
    summary.pending = len(todo) - summary.done - summary.failed
    if summary.pending:
        log.warning("fix: %d record(s) not sent (%s); the next run does them", summary.pending, _why_stopped(endpoint))


def _why_stopped(endpoint: ChatEndpoint) -> str:
    if endpoint.unreachable.is_set():
        return f"{endpoint.where} stopped answering"
    return f"the request budget of {endpoint.cfg.budget} is spent"


def _fix_local(cfg, loaded, todo, out, bar, summary) -> None:
    from mmalign.chat.generate import generate_batch

    size = cfg.fix.batch_size
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        items = [(None, [{"role": "user", "content": fix_message(cfg, r["text"])}]) for r in chunk]
        texts = generate_batch(loaded, items, system=None, max_new_tokens=cfg.fix.max_new_tokens)
        for rec, text in zip(chunk, texts):
            fields = _fix_fields(cfg, rec, loaded.name)
            if text.strip():
                out.done(rec["id"], **fields, raw=text, text=text.strip())
                summary.done += 1
            else:
                out.failed(rec["id"], "malformed reply: the reply holds no text", **fields, raw=text)
                summary.failed += 1
                summary.reasons["malformed reply"] += 1
        bar.update(len(chunk))


# --------------------------------------------------------------------------- filter


def run_filter(cfg: CurateConfig, *, redo: bool = False) -> StepSummary:
    """Apply the rules to every fixed record not filtered yet; write and print the rule table.

    Some rules judge a record against all the others (``ignores_image`` counts identical texts),
    so each filter record keeps a fingerprint of the fixed set it was judged in: when the fix
    step has finished more records since (it was interrupted), the whole set is filtered again,
    and the export equals an uninterrupted run's. One process does it (rank 0): it is cheap."""
    summary = StepSummary("filter")
    if rank_world(None, None)[0] != 0:
        return summary
    fixed = sorted(done_records(cfg.workdir, "fix").values(), key=lambda r: (r["image"], r["id"]))
    if not fixed:
        raise ValueError(f"filter: no fixed records in {cfg.workdir}/fix (run `mmalign curate fix` first)")
    fingerprint = hashlib.sha256(json.dumps([(r["id"], r["text"]) for r in fixed]).encode()).hexdigest()[:16]
    earlier = {r.get("fixed_set") for r in read_step(cfg.workdir, "filter").values()}
    if redo or cfg.filter.redo or earlier - {fingerprint}:
        if not (redo or cfg.filter.redo):
            log.info("filter: the fixed set changed since the last filter run; filtering all of it again")
        archive_step(cfg.workdir, "filter")
    pending = len(done_records(cfg.workdir, "describe")) - len(fixed)
    if pending:
        log.warning("filter: %d described record(s) are not fixed yet; a later filter run includes them", pending)
    rules = parse_rules(cfg.filter.rules, "filter.rules")
    for rule in rules:
        rule.prepare([r["text"] for r in fixed])
    todo = _todo(fixed, read_step(cfg.workdir, "filter"), lambda r: r["id"], summary)
    with StepLog(cfg.workdir, "filter") as out, _bar("filter", len(fixed), summary.already, "rec") as bar:
        for rec in todo:
            first, matched = apply_rules(rules, rec["text"])
            verdict = {"kept": first is None, "rule": first, "matched": matched, "fixed_set": fingerprint}
            out.done(rec["id"], image=rec["image"], text=rec["text"], **verdict)
            summary.done += 1
            bar.update(1)
    table = filter_table(cfg, rules)
    print(table)
    log.info(summary.line())
    return summary


def filter_table(cfg: CurateConfig, rules: Iterable | None = None) -> str:
    """The rule table over every filtered record, also written to ``<workdir>/filter/report.md``."""
    rules = list(rules) if rules is not None else parse_rules(cfg.filter.rules, "filter.rules")
    records = done_records(cfg.workdir, "filter").values()
    dropped = Counter(r["rule"] for r in records if not r["kept"])
    table = rule_table(dropped, rules, len(records))
    Path(cfg.workdir, "filter", "report.md").write_text(f"# Records removed per rule\n\n{table}\n")
    return table


__all__ = ["StepSummary", "filter_table", "fix_message", "rank_world", "run_describe", "run_filter", "run_fix"]
