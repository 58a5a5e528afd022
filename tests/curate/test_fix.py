"""The fix step against a real local HTTP server speaking the OpenAI protocol: retries on
timeouts, 429 and 500; malformed and empty replies; a request budget; a server that dies
mid-run. Whatever fails stays pending and is completed by the next run, never twice."""

from __future__ import annotations

import json

import pytest

from mmalign.curate.config import CurateConfig, EndpointConfig
from mmalign.curate.endpoint import ChatEndpoint
from mmalign.curate.steps import run_fix
from mmalign.curate.store import StepLog, done_records, read_lines, read_step, step_files

from .fake_openai import FakeOpenAI


def described(tmp_path, paragraphs: list[str]) -> CurateConfig:
    cfg = CurateConfig(workdir=str(tmp_path))
    with StepLog(tmp_path, "describe") as log:
        for i, p in enumerate(paragraphs):
            log.done(f"id{i:02d}", image=f"img{i:02d}.jpg", text=p)
    return cfg


def endpoint(url: str, **kw) -> ChatEndpoint:
    settings = dict(base_url=url, model="fake", timeout_s=0.5, max_attempts=3, backoff_s=0.01, concurrency=4)
    return ChatEndpoint(EndpointConfig(**{**settings, **kw}))


def done_lines(tmp_path) -> list[str]:
    return [r["id"] for r in read_lines(step_files(tmp_path, "fix")) if r["status"] == "done"]


@pytest.fixture
def server():
    s = FakeOpenAI(slow_s=1.5)
    yield s
    s.stop()


def test_retries_recover_and_what_cannot_be_read_stays_pending(tmp_path, server):
    paragraphs = ["plain one.", "[429x2] busy.", "[500x1] crash.", "[slowx1] slow.", "[429x5] very busy."]
    paragraphs += ["[malformedx1] junk.", "[emptyx1] nothing.", "[lengthx1] cut off."]
    cfg = described(tmp_path, paragraphs)
    first = run_fix(cfg, endpoint(server.url), rank=0, world=1)

    state = read_step(tmp_path, "fix")
    ok = {k for k, r in state.items() if r["status"] == "done"}
    assert ok == {"id00", "id01", "id02", "id03"}  # 429 twice, a 500, a timeout: retried within the run
    assert state["id01"]["text"] == "FIXED [429x2] busy." and state["id01"]["prompt"].endswith("[429x2] busy.")
    assert json.loads(state["id01"]["raw"])["choices"][0]["message"]["content"] == "FIXED [429x2] busy."
    assert state["id04"]["status"] == "failed" and "HTTP 429" in state["id04"]["error"]
    assert state["id05"]["status"] == "failed" and "malformed reply" in state["id05"]["error"]
    assert state["id05"]["raw"] == "<html>upstream error</html>"  # the raw reply is kept
    assert state["id06"]["status"] == "failed" and "no text" in state["id06"]["error"]
    assert state["id07"]["status"] == "failed" and "truncated reply" in state["id07"]["error"]
    assert json.loads(state["id07"]["raw"])["choices"][0]["finish_reason"] == "length"
    assert first.done == 4 and first.failed == 4

    second = run_fix(cfg, endpoint(server.url), rank=0, world=1)
    assert second.already == 4 and second.done == 4 and second.failed == 0
    fixed = done_records(tmp_path, "fix")
    assert {k: r["text"] for k, r in fixed.items()} == {f"id{i:02d}": f"FIXED {p}" for i, p in enumerate(paragraphs)}
    assert sorted(done_lines(tmp_path)) == sorted(fixed)  # one done line per record, ever


def test_the_request_budget_leaves_the_rest_pending(tmp_path, server):
    cfg = described(tmp_path, [f"paragraph {i}." for i in range(6)])
    summary = run_fix(cfg, endpoint(server.url, budget=3, concurrency=1), rank=0, world=1)
    assert summary.done == 3 and summary.pending == 3 and server.requests == 3
    assert len(read_step(tmp_path, "fix")) == 3  # nothing recorded for records never sent
    run_fix(cfg, endpoint(server.url), rank=0, world=1)
    assert len(done_records(tmp_path, "fix")) == 6 and len(done_lines(tmp_path)) == 6


def test_a_server_that_dies_mid_run_leaves_its_records_pending(tmp_path):
    dying = FakeOpenAI(die_after=3)
    cfg = described(tmp_path, [f"paragraph {i}." for i in range(10)])
    try:
        summary = run_fix(cfg, endpoint(dying.url, concurrency=1, max_attempts=2), rank=0, world=1)
    finally:
        dying.stop()
    assert summary.done == 3 and summary.failed >= 1 and summary.done + summary.failed + summary.pending == 10
    failed = [r for r in read_step(tmp_path, "fix").values() if r["status"] == "failed"]
    assert failed and all("connection error" in r["error"] for r in failed)

    revived = FakeOpenAI()
    try:
        again = run_fix(cfg, endpoint(revived.url), rank=0, world=1)
    finally:
        revived.stop()
    assert again.already == 3 and again.done == 7
    assert sorted(done_lines(tmp_path)) == [f"id{i:02d}" for i in range(10)]


def test_fix_needs_described_records(tmp_path, server):
    with pytest.raises(ValueError, match="no described records"):
        run_fix(CurateConfig(workdir=str(tmp_path)), endpoint(server.url), rank=0, world=1)


def test_ranks_share_the_records(tmp_path, server):
    cfg = described(tmp_path, [f"paragraph {i}." for i in range(5)])
    for rank in (0, 1):
        run_fix(cfg, endpoint(server.url), rank=rank, world=2)
    assert len(done_records(tmp_path, "fix")) == 5
    assert sorted(p.name for p in (tmp_path / "fix").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]


def test_the_local_backend_repairs_with_the_shipped_toy_fix_model(tmp_path):
    from mmalign.data import toyworld as tw
    from mmalign.model import LoadedModel
    from mmalign.toy.curate import FIX_MODEL

    clean = [tw.description(tw.make_scene(s)) for s in (20_000_001, 20_000_002)]
    cfg = described(tmp_path, [clean[0] + " zero", clean[1]])  # the toy's "Continue" answer, and a correct one
    summary = run_fix(cfg, LoadedModel.load(FIX_MODEL), rank=0, world=1)
    assert summary.done == 2
    assert [r["text"] for _, r in sorted(done_records(tmp_path, "fix").items())] == clean
