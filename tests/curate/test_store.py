"""The step store: one record per id, a done record never redone, a cut-off line skipped."""

from __future__ import annotations

import json

import pytest

from mmalign.curate.store import StepLog, archive_step, done_records, read_step


def test_done_wins_over_failures_and_failures_are_counted(tmp_path):
    with StepLog(tmp_path, "fix") as log:
        log.failed("a", "HTTP 500")
        log.failed("a", "timeout")
        log.done("a", text="fixed")
        log.failed("b", "malformed reply")
    state = read_step(tmp_path, "fix")
    assert state["a"]["status"] == "done" and state["a"]["text"] == "fixed" and state["a"]["attempts"] == 2
    assert state["b"]["status"] == "failed" and state["b"]["error"] == "malformed reply"
    assert set(done_records(tmp_path, "fix")) == {"a"}


def test_a_line_cut_off_by_a_kill_is_skipped_and_the_next_append_starts_a_new_line(tmp_path):
    with StepLog(tmp_path, "describe") as log:
        log.done("a", text="one")
    path = tmp_path / "describe" / "rank0.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "b", "status": "do')  # SIGKILL mid-write
    with StepLog(tmp_path, "describe") as log:
        log.done("b", text="two")
    assert {k: r["text"] for k, r in done_records(tmp_path, "describe").items()} == {"a": "one", "b": "two"}
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["id"] == "b"


def test_ranks_write_their_own_files_and_are_read_together(tmp_path):
    for rank in (0, 1):
        with StepLog(tmp_path, "describe", rank) as log:
            log.done(f"id{rank}")
    assert sorted(p.name for p in (tmp_path / "describe").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    assert set(done_records(tmp_path, "describe")) == {"id0", "id1"}


def test_a_second_done_line_is_reported_and_the_first_kept(tmp_path, caplog):
    with StepLog(tmp_path, "fix") as log:
        log.done("a", text="first")
        log.done("a", text="second")
    assert read_step(tmp_path, "fix")["a"]["text"] == "first"
    assert "more than one done line" in caplog.text


def test_records_need_an_id_and_a_status(tmp_path):
    with StepLog(tmp_path, "fix") as log, pytest.raises(ValueError, match="id and status"):
        log.append({"id": "a", "status": "maybe"})


def test_archive_moves_a_step_aside(tmp_path):
    with StepLog(tmp_path, "filter") as log:
        log.done("a")
    (moved,) = archive_step(tmp_path, "filter")
    assert moved.name.startswith("rank0.jsonl.old-") and read_step(tmp_path, "filter") == {}
