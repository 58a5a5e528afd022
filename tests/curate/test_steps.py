"""The filter step judges each record against the whole fixed set: filtering after an
interrupted fix and again after it finished gives what filtering once at the end gives."""

from __future__ import annotations

from mmalign.curate.config import CurateConfig
from mmalign.curate.steps import run_filter
from mmalign.curate.store import StepLog, done_records

SAME = "A red circle is in the middle of the picture and it is the only object that the image shows."


def _records(n_same: int) -> list[tuple[str, str]]:
    colours = ("blue", "green", "yellow")
    other = [
        (f"u{c}", f"A {c} square sits at the top left corner of a plain white picture today, alone.") for c in colours
    ]
    return [(f"s{i}", SAME) for i in range(n_same)] + other


def _write(workdir, step: str, records) -> None:
    with StepLog(workdir, step) as out:
        for id_, text in records:
            out.done(id_, image=f"{id_}.jpg", text=text)


def test_filter_after_a_partial_fix_is_redone_when_the_fix_finishes(tmp_path):
    rules = [{"name": "ignores_image", "max_images": 3}]
    everything = _records(4)
    once, twice = CurateConfig(workdir=str(tmp_path / "once")), CurateConfig(workdir=str(tmp_path / "twice"))
    for cfg in (once, twice):
        cfg.filter.rules = rules
        _write(cfg.workdir, "describe", everything)
    _write(once.workdir, "fix", everything)
    run_filter(once)

    _write(twice.workdir, "fix", everything[2:])  # the fix step stopped half way: 2 of the same text fixed
    run_filter(twice)
    assert all(r["kept"] for r in done_records(twice.workdir, "filter").values())  # 2 < 3 images: kept, for now
    _write(twice.workdir, "fix", everything[:2])  # the next fix run finishes
    run_filter(twice)

    def verdicts(cfg):
        return {k: (r["kept"], r["rule"]) for k, r in done_records(cfg.workdir, "filter").items()}

    assert verdicts(twice) == verdicts(once)
    assert [k for k, (kept, _) in verdicts(once).items() if not kept] == ["s0", "s1", "s2", "s3"]  # 4 images, one text
