"""Every step resumes: the pipeline killed with SIGKILL in the middle of describe and of fix,
then run again, writes no duplicate, loses nothing, and exports exactly what an uninterrupted
run exports."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mmalign.cli import main
from mmalign.curate.config import load_curate_config
from mmalign.curate.review import ReviewDB, review_items
from mmalign.curate.store import read_lines, step_files
from mmalign.data.sources import read_caption_json, read_llava_json

from .conftest import subprocess_env
from .fake_openai import FakeOpenAI


def write_config(folder: Path, images: Path, model: Path, url: str) -> Path:
    cfg = {
        "workdir": str(folder / "work"),
        "images": str(images),
        "describe": {"model": str(model), "min_tokens": 12, "max_new_tokens": 10, "batch_size": 1},
        "fix": {"endpoint": {"base_url": url, "model": "fake", "concurrency": 2, "backoff_s": 0.01}},
        "filter": {"rules": [{"name": "failure_phrase", "kind": "phrases"}, {"name": "too_short", "min_words": 2}]},
    }
    path = folder / "curate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def done_ids(workdir: Path, step: str) -> list[str]:
    return [r["id"] for r in read_lines(step_files(workdir, step)) if r["status"] == "done"]


def kill_mid_step(config: Path, step: str, after: int) -> int:
    """Run `mmalign curate <step>` in a subprocess and SIGKILL it once `after` records are done;
    returns how many were done when it died."""
    cmd = [sys.executable, "-m", "mmalign.cli", "curate", step, str(config)]
    proc = subprocess.Popen(cmd, env=subprocess_env())
    workdir = load_curate_config(config).workdir
    deadline = time.monotonic() + 300
    try:
        while (n := len(done_ids(Path(workdir), step)) if step_files(workdir, step) else 0) < after:
            assert proc.poll() is None, f"`curate {step}` ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return n


def review(config: Path) -> None:
    """The same decisions for the same records: accept, reject, edit in turn."""
    cfg = load_curate_config(config)
    db = ReviewDB(cfg.db_path)
    for i, item in enumerate(review_items(cfg)):
        decision = ("accepted", "rejected", "edited")[i % 3]
        db.decide(item["id"], decision, item["text"] + (" Edited." if decision == "edited" else ""), "t")


def export_files(config: Path) -> dict[str, bytes]:
    out = load_curate_config(config).export_dir
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_sigkill_mid_step_then_rerun_exports_what_an_uninterrupted_run_does(tmp_path, toy_folder, toy_images):
    server = FakeOpenAI(delay_s=0.15)
    try:
        (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
        straight = write_config(tmp_path / "a", toy_images, toy_folder, server.url)
        killed = write_config(tmp_path / "b", toy_images, toy_folder, server.url)
        for step in ("describe", "fix", "filter"):
            main(["curate", step, str(straight)])
        review(straight)
        main(["curate", "export", str(straight)])

        assert kill_mid_step(killed, "describe", after=3) < 12
        main(["curate", "describe", str(killed)])
        assert kill_mid_step(killed, "fix", after=3) < 12
        main(["curate", "fix", str(killed)])
        main(["curate", "filter", str(killed)])
        main(["curate", "filter", str(killed)])  # a finished step run again changes nothing
        review(killed)
        main(["curate", "export", str(killed)])
    finally:
        server.stop()

    work = tmp_path / "b" / "work"
    for step in ("describe", "fix", "filter"):
        ids = done_ids(work, step)
        assert len(ids) == len(set(ids)) == 12, step  # no duplicate, nothing lost (the corrupt image is pending)
    want, got = export_files(straight), export_files(killed)
    assert got == want
    kept = json.loads(want["cc_sbu_align/filter_cap.json"])["annotations"]
    assert len(kept) == 8 and sum(a["caption"].endswith(" Edited.") for a in kept) == 4
    assert len([k for k in want if k.startswith("cc_sbu_align/image/")]) == 8
    out = load_curate_config(killed).export_dir  # ready for `mmalign train`, in both layouts
    assert len(read_caption_json(out / "cc_sbu_align" / "filter_cap.json", check_images=True)) == 8
    llava = read_llava_json(out / "llava.json", template="minigpt4_v0", check_images=True)
    assert len(llava) == 8 and llava[0].turns[0]["content"].startswith("<Img><ImageHere></Img> ")
    funnel = json.loads(want["funnel.json"])
    assert (funnel["described"], funnel["describe_failed"], funnel["rejected"], funnel["kept"]) == (12, 1, 4, 8)
