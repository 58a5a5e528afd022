"""Where curation state lives: one append-only JSONL file per step and rank, read back as one
record per id.

A line is one attempt at one record: ``status`` "done" (with the step's output) or "failed"
(with ``error``; the next run tries it again). A record's state is its done line if it has one,
else its latest failed line, so a rerun never attempts a done record and never writes a second
done line for it. Appending whole lines is what cluster file systems handle well, and a process
killed mid-write leaves at most one cut-off last line: it is skipped on reading and kept on its
own line (the next append starts on a new one). One process writes a (step, rank) file; a lock
serialises the threads that share it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DONE, FAILED = "done", "failed"


class StepLog:
    """The append side of one step's file for this rank."""

    def __init__(self, workdir: str | Path, step: str, rank: int = 0) -> None:
        self.path = Path(workdir) / step / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step = step
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")
        if _ends_without_newline(self.path):
            self._file.write("\n")  # a line cut off by a kill stays on its own, unreadable, line
            self._file.flush()

    def append(self, record: dict[str, Any]) -> None:
        """Write one attempt (needs ``id`` and ``status``) and flush it at once."""
        if "id" not in record or record.get("status") not in (DONE, FAILED):
            raise ValueError(f"a {self.step} record needs an id and status done/failed, got {sorted(record)}")
        line = json.dumps({**record, "step": self.step, "time": round(time.time(), 3)}, ensure_ascii=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def done(self, id_: str, **fields: Any) -> None:
        self.append({"id": id_, "status": DONE, **fields})

    def failed(self, id_: str, error: str, **fields: Any) -> None:
        self.append({"id": id_, "status": FAILED, "error": error, **fields})

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _ends_without_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def step_files(workdir: str | Path, step: str) -> list[Path]:
    return sorted((Path(workdir) / step).glob("rank*.jsonl"))


def read_lines(paths: Iterable[Path]) -> Iterable[dict[str, Any]]:
    """Every readable record line; a cut-off or corrupt line is logged and skipped."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    rec["id"], rec["status"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s line %d: not a complete record (cut off by a kill?); skipped", path, n)
                    continue
                yield rec


def read_step(workdir: str | Path, step: str) -> dict[str, dict[str, Any]]:
    """One record per id over every rank's file: the done line, else the latest failed line
    (with ``attempts``, how many failed lines it has). A second done line for an id is a bug
    somewhere (two processes given the same ids): the first one stays, the count is logged."""
    out: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for rec in read_lines(step_files(workdir, step)):
        old = out.get(rec["id"])
        if old is not None and old["status"] == DONE:
            duplicates += rec["status"] == DONE
            continue
        attempts = (old or {}).get("attempts", 0) + (rec["status"] == FAILED)
        out[rec["id"]] = {**rec, "attempts": attempts}
    if duplicates:
        log.warning("%s: %d id(s) have more than one done line; the first of each is used", step, duplicates)
    return out


def done_records(workdir: str | Path, step: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in read_step(workdir, step).items() if r["status"] == DONE}


def archive_step(workdir: str | Path, step: str) -> list[Path]:
    """Move a step's files aside (``--redo``): kept for the audit, no longer read."""
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in step_files(workdir, step):
        target = path.with_name(f"{path.name}.old-{stamp}")
        path.rename(target)
        moved.append(target)
    return moved


def write_json_atomic(path: str | Path, data: Any) -> None:
    """A JSON file that is either the old one or the whole new one, never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


__all__ = [
    "DONE",
    "FAILED",
    "StepLog",
    "archive_step",
    "done_records",
    "read_lines",
    "read_step",
    "step_files",
    "write_json_atomic",
]
