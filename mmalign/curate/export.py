"""Step 5, export: the accepted records as training data, and the funnel of the whole pipeline.

- ``cc_sbu_align/filter_cap.json`` = ``{"annotations": [{"image_id", "caption"}]}`` +
  ``cc_sbu_align/image/{image_id}.jpg``: MiniGPT-4's released stage-2 layout (``mmalign train``
  with ``data.source: conversations`` reads it, drawing one of the four instructions per sample);
- ``llava.json``: LLaVA conversation JSON, one instruction per record (chosen by its id);
- ``funnel.md`` / ``funnel.json``: described, continued, fixed, dropped per rule, rejected in
  review, kept: the paper's 5,000 -> ~3,500.

The export is written to a temporary folder and renamed into place, so it is whole or absent;
records come in a stable order (image path, then id), so the same decisions give byte-identical
files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mmalign.curate.config import CurateConfig
from mmalign.curate.review import KEPT, ReviewDB, review_items
from mmalign.curate.store import DONE, done_records, read_step
from mmalign.prompts import IMAGE_TOKEN, MINIGPT4_INSTRUCTIONS


def _jpeg_bytes(path: str, quality: int) -> bytes:
    data = Path(path).read_bytes()
    if data[:3] == b"\xff\xd8\xff":  # already a JPEG: the bytes as they are
        return data
    buf = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def instruction_for(id_: str) -> str:
    """One of MiniGPT-4's four instructions, fixed by the record's id (so exports are stable)."""
    digest = hashlib.sha256(id_.encode()).digest()  # any id, not only the sha256 ones images get
    return MINIGPT4_INSTRUCTIONS[int.from_bytes(digest[:4], "big") % len(MINIGPT4_INSTRUCTIONS)]


def kept_records(cfg: CurateConfig) -> list[dict[str, Any]]:
    """Reviewed-and-kept records in export order, with the text as the reviewer left it."""
    decisions = ReviewDB(cfg.db_path).decisions()
    out = []
    for item in review_items(cfg):
        d = decisions.get(item["id"])
        if d is not None and d["decision"] in KEPT:
            out.append({**item, "text": d["text"], "decision": d["decision"]})
    return out


def run_export(cfg: CurateConfig) -> Path:
    """Write the export folder (see the module doc); returns it."""
    out = cfg.export_dir
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "cc_sbu_align" / "image").mkdir(parents=True)
    annotations, conversations = [], []
    for rec in tqdm(kept_records(cfg), desc="export", unit="rec", dynamic_ncols=True):
        image_id = rec["id"]
        (tmp / "cc_sbu_align" / "image" / f"{image_id}.jpg").write_bytes(
            _jpeg_bytes(rec["image"], cfg.export.jpeg_quality)
        )
        annotations.append({"image_id": image_id, "caption": rec["text"]})
        conversations.append(
            {
                "id": image_id,
                "image": f"cc_sbu_align/image/{image_id}.jpg",
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\n{instruction_for(image_id)}"},
                    {"from": "gpt", "value": rec["text"]},
                ],
            }
        )
    _write(tmp / "cc_sbu_align" / "filter_cap.json", {"annotations": annotations})
    _write(tmp / "llava.json", conversations)
    f = funnel(cfg)
    _write(tmp / "funnel.json", f)
    (tmp / "funnel.md").write_text(funnel_table(f) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(funnel_table(f))
    return out


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def funnel(cfg: CurateConfig) -> dict[str, Any]:
    """How many records reached each step, and why the others did not."""
    described = read_step(cfg.workdir, "describe")
    fixed = read_step(cfg.workdir, "fix")
    filtered = done_records(cfg.workdir, "filter")
    decisions = ReviewDB(cfg.db_path).decisions()
    passed = [r["id"] for r in filtered.values() if r["kept"]]
    review = Counter(decisions[i]["decision"] for i in passed if i in decisions)
    ok = [r for r in described.values() if r["status"] == DONE]
    return {
        "images": len(described),
        "described": len(ok),
        "continued": sum(bool(r.get("continued")) for r in ok),
        "describe_failed": len(described) - len(ok),
        "fixed": sum(r["status"] == DONE for r in fixed.values()),
        "fix_pending": len(ok) - sum(r["status"] == DONE for r in fixed.values()),
        "filtered": len(filtered),
        "dropped_by_rule": dict(Counter(r["rule"] for r in filtered.values() if not r["kept"]).most_common()),
        "passed_filters": len(passed),
        "accepted": review.get("accepted", 0),
        "edited": review.get("edited", 0),
        "rejected": review.get("rejected", 0),
        "not_reviewed": len(passed) - sum(review.values()),
        "kept": review.get("accepted", 0) + review.get("edited", 0),
    }


def funnel_table(f: dict[str, Any]) -> str:
    """The funnel as Markdown (the paper's 5,000 images -> ~3,500 descriptions)."""
    rows = [
        ("images described (failed: still pending)", f"{f['described']} ({f['describe_failed']})"),
        ("↳ asked to Continue", f["continued"]),
        ("fixed by the LLM (pending)", f"{f['fixed']} ({f['fix_pending']})"),
        *[(f"↳ dropped by rule `{rule}`", n) for rule, n in f["dropped_by_rule"].items()],
        ("passed the filters", f["passed_filters"]),
        ("↳ rejected in review", f["rejected"]),
        ("↳ edited in review", f["edited"]),
        ("↳ not reviewed yet", f["not_reviewed"]),
        ("**kept (exported)**", f"**{f['kept']}**"),
    ]
    return "\n".join(["| step | records |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]])


__all__ = ["funnel", "funnel_table", "instruction_for", "kept_records", "run_export"]
