"""Step 4, review: a person (or, in the toy, an oracle) accepts, rejects or edits each record
that passed the filters.

Decisions live in SQLite (``<workdir>/review.sqlite``): several reviewers may use the page at
once, and each decision is committed the moment it is made (one short transaction; WAL so
readers never wait). ``decisions`` holds the latest decision per record, ``history`` every one.

``mmalign curate review`` opens a local Gradio page: the image beside the text, Accept (``a``),
Reject (``r``), edit the text (``e`` to focus it, ``Ctrl+Enter`` saves the edit), previous /
next (``k`` / ``j`` or the arrow keys), progress (reviewed / left) and a filter by status. A
timer refreshes the progress and the shown record's decision, so a second tab sees the first
tab's decisions without a reload.
"""

from __future__ import annotations

import contextlib
import getpass
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmalign.curate.config import CurateConfig
from mmalign.curate.store import done_records

DECISIONS = ("accepted", "rejected", "edited")
KEPT = ("accepted", "edited")
SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id TEXT PRIMARY KEY,
    decision TEXT NOT NULL CHECK (decision IN ('accepted', 'rejected', 'edited')),
    text TEXT NOT NULL,           -- the text as accepted (the edit, for 'edited')
    reviewer TEXT NOT NULL,
    decided_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL, decision TEXT NOT NULL, text TEXT NOT NULL, reviewer TEXT NOT NULL, decided_at REAL NOT NULL
);
"""


class ReviewDB:
    """The review decisions; every call opens, commits and closes its own connection (threads
    and processes can share the file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()

    def decide(self, id_: str, decision: str, text: str, reviewer: str | None = None) -> None:
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
        row = (id_, decision, text, reviewer or default_reviewer(), time.time())
        with self._connect() as c:
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?)", row)
            c.execute("INSERT INTO history (id, decision, text, reviewer, decided_at) VALUES (?, ?, ?, ?, ?)", row)
            c.execute("COMMIT")

    def decisions(self) -> dict[str, dict[str, Any]]:
        with self._connect() as c:
            rows = c.execute("SELECT id, decision, text, reviewer, decided_at FROM decisions").fetchall()
        return {r[0]: {"decision": r[1], "text": r[2], "reviewer": r[3], "decided_at": r[4]} for r in rows}

    def history(self) -> list[tuple]:
        with self._connect() as c:
            return c.execute("SELECT id, decision, reviewer FROM history ORDER BY n").fetchall()


def default_reviewer() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 (no user name in some containers)
        return "reviewer"


def review_items(cfg: CurateConfig) -> list[dict[str, Any]]:
    """The records that passed the filters, in a stable order, with what a reviewer audits:
    the prompt, the model's own description (and its continuation), and the fixed text."""
    described = done_records(cfg.workdir, "describe")
    fixed = done_records(cfg.workdir, "fix")
    kept = [r for r in done_records(cfg.workdir, "filter").values() if r["kept"]]
    items = []
    for r in sorted(kept, key=lambda r: (r["image"], r["id"])):
        d, f = described.get(r["id"], {}), fixed.get(r["id"], {})
        items.append(
            {
                "id": r["id"],
                "image": r["image"],
                "text": r["text"],
                "prompt": d.get("prompt", ""),
                "answer": d.get("answer", ""),
                "continuation": d.get("continuation", ""),
                "fix_model": f.get("model", ""),
            }
        )
    return items


def progress(items: list[dict[str, Any]], decisions: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts = {k: 0 for k in DECISIONS}
    for item in items:
        d = decisions.get(item["id"])
        if d is not None:
            counts[d["decision"]] += 1
    reviewed = sum(counts.values())
    return {"total": len(items), "reviewed": reviewed, "left": len(items) - reviewed, **counts}


__all__ = ["DECISIONS", "KEPT", "ReviewDB", "default_reviewer", "progress", "review_items"]
