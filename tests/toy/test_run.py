"""The main job's plumbing end to end, on the shipped toy backbones, in a few steps."""

import json

from mmalign.model import load_model, template_of
from mmalign.toy import run


def test_quick_main_job_trains_exports_and_reports(tmp_path, capsys):
    metrics = run.main_job(tmp_path, quick=True)

    assert set(metrics) == {"stage1", "stage2"}
    for stage in ("stage1", "stage2"):
        m = metrics[stage]
        assert set(m["vqa_accuracy"]) >= {"colour", "shape", "count", "presence"}
        assert 0.0 <= m["describe_long"]["chair_i"] <= 1.0
        saved = json.loads((tmp_path / f"eval-{stage}" / "metrics.json").read_text())
        assert saved["n_questions"] == m["n_questions"] > 0
    # stage 2 started from stage 1's projection (only the projection trains in both)
    assert json.loads((tmp_path / "stage2" / "config.json").read_text())["model"]["init_trainable"].endswith(
        "checkpoint-4"
    )
    # what users get: an exported folder that loads and remembers its chat template
    model, tokenizer = load_model(str(tmp_path / "model-stage2"))
    assert template_of(tmp_path / "model-stage2") == "minigpt4_v0"
    assert model.config.model_type == "minigpt4_patch"
    report = (tmp_path / "report.md").read_text()
    assert "| colour accuracy |" in report and (tmp_path / "report.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "Sample chat" in out and out.count("Assistant:") == 2
