"""The main job's plumbing end to end, on the shipped toy backbones, in a few steps: stage 1, the
stage-1 model's own curation (describe, the fix model over HTTP, filter, review, export), stage
2 on that set and on the generator-written one, each from a feature cache of its own records
(``--baseline``: from images), three evaluations, one report."""

import json

from mmalign.model import load_model, template_of
from mmalign.toy import run


def test_quick_main_job_curates_trains_exports_and_reports(tmp_path, capsys):
    metrics = run.main_job(tmp_path, quick=True)

    assert set(metrics) == {"stage1", "stage2", "stage2-generator"}
    for stage in metrics:
        m = metrics[stage]
        assert set(m["vqa_accuracy"]) >= {"colour", "shape", "count", "presence"}
        assert 0.0 <= m["describe_long"]["chair_i"] <= 1.0
        saved = json.loads((tmp_path / f"eval-{stage}" / "metrics.json").read_text())
        assert saved["n_questions"] == m["n_questions"] > 0
    # the self-curated stage 2 trained on the curation's export, from stage 1's projection
    stage2 = json.loads((tmp_path / "stage2" / "config.json").read_text())
    assert stage2["data"]["path"] == str(tmp_path / "curate" / "export" / "cc_sbu_align" / "filter_cap.json")
    assert stage2["model"]["init_trainable"].endswith("checkpoint-4")
    # each training run read features cached from its own records (the curated set's after curation)
    for name in ("stage1", "stage2", "stage2-generator"):
        used = json.loads((tmp_path / name / "config.json").read_text())["data"]
        assert used["features"] == str(tmp_path / f"features-{name}")
        cache = json.loads((tmp_path / f"features-{name}" / "cache.json").read_text())
        assert cache["written"]["images"] > 0
    assert json.loads((tmp_path / "features-stage2" / "cache.json").read_text())["written"]["images"] <= 48
    assert set(json.loads((tmp_path / "timings.json").read_text())) >= {"toy data", "evaluate stage2 (16 scenes)"}
    funnel = json.loads((tmp_path / "curate" / "export" / "funnel.json").read_text())
    assert funnel["described"] == 48 and funnel["fixed"] == 48 and funnel["kept"] > 0
    fixed = [json.loads(x) for x in (tmp_path / "curate" / "fix" / "rank0.jsonl").read_text().splitlines()]
    assert all(r["model"].startswith("http://127.0.0.1:") and "toy-fix" in r["model"] for r in fixed)  # over HTTP
    # what users get: exported folders that load and remember their chat template
    model, tokenizer = load_model(str(tmp_path / "model-stage2"))
    assert template_of(tmp_path / "model-stage2") == "minigpt4_v0"
    assert model.config.model_type == "minigpt4_patch"
    report = (tmp_path / "report.md").read_text()
    assert "| colour accuracy |" in report and (tmp_path / "report.png").stat().st_size > 1000
    assert "| metric | stage1 | stage2 | stage2-generator |" in report
    assert "## The self-curated stage-2 set" in report and "**kept (exported)**" in report
    assert "## Time per phase" in report and "| curation (describe, fix over HTTP, filter, review, export) |" in report
    out = capsys.readouterr().out
    assert "Sample chat" in out and out.count("Assistant:") == 2 and out.count("[phase]") == 8


def test_baseline_trains_from_images_with_the_old_settings(tmp_path):
    speed = run.SpeedPath(tmp_path, ("model.llm=DIR",), baseline=True)

    overrides = speed("stage1", tmp_path / "captions.json")

    assert overrides == (*run.BASELINE, "model.llm=DIR")  # user overrides last: they win
    assert "data.features=null" in overrides and not list(tmp_path.iterdir())  # nothing cached
