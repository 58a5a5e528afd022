"""The evaluation loop: batching does not change answers, runs resume, records re-score, CLI."""

import json

import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.evaluate import runner
from mmalign.evaluate.runner import Sample, get_task, parse_models, read_predictions, run_task
from mmalign.evaluate.toy import TASK as TOY
from mmalign.evaluate.toy import toy_samples
from mmalign.model import LoadedModel

TEMPLATE = "minigpt4_v0"


def small_toy(n=3):
    return toy_samples(n_scenes=n)


def test_batched_predictions_equal_batch_size_one(tiny_model, tmp_path):
    model, tok = tiny_model
    samples = small_toy(3)
    kinds = {s.max_new_tokens for s in samples}
    assert kinds == {8, 120} and len(samples) > 20  # short answers and long descriptions, several batches
    one = run_task(TOY, samples, tmp_path / "b1", LoadedModel.of(model, tok, TEMPLATE), batch_size=1, progress=False)
    many = run_task(TOY, samples, tmp_path / "b7", LoadedModel.of(model, tok, TEMPLATE), batch_size=7, progress=False)
    preds = lambda r: [x["prediction"] for x in r.records]  # noqa: E731
    assert preds(one) == preds(many)
    assert len(set(preds(one))) > 1  # real, prompt-dependent answers were compared
    assert one.metrics == many.metrics
    assert (tmp_path / "b7" / "predictions.jsonl").read_text() == (tmp_path / "b1" / "predictions.jsonl").read_text()


def test_interrupted_run_resumes_to_the_same_report(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    samples = small_toy(2)
    full = run_task(TOY, samples, tmp_path / "full", LoadedModel.of(model, tok, TEMPLATE), batch_size=4, progress=False)

    real, calls = runner.generate, []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_task(TOY, samples, tmp_path / "cut", LoadedModel.of(model, tok, TEMPLATE), batch_size=4, progress=False)
    saved = (tmp_path / "cut" / "predictions.jsonl").read_text().splitlines()
    assert len(saved) == 8  # two batches of 4 made it to disk
    with open(tmp_path / "cut" / "predictions.jsonl", "a") as f:
        f.write('{"id": "qa/30000000/0", "predic')  # killed mid-line: ignored, answered again

    monkeypatch.setattr(runner, "generate", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    calls.clear()
    resumed = run_task(
        TOY, samples, tmp_path / "cut", LoadedModel.of(model, tok, TEMPLATE), batch_size=4, progress=False
    )
    assert sum(calls) == len(samples) - 8  # only the missing samples were generated
    assert resumed.metrics == full.metrics
    assert len(read_predictions(tmp_path / "cut" / "predictions.jsonl")) == len(samples)  # all readable on disk
    assert [r["prediction"] for r in resumed.records] == [r["prediction"] for r in full.records]
    # the same report from both folders
    from mmalign.evaluate.report import write_report

    rows = TOY.rows(full.metrics)
    assert write_report("t", {"m": resumed.metrics}, rows, tmp_path / "r1") == write_report(
        "t", {"m": full.metrics}, rows, tmp_path / "r2"
    )


def test_rescore_without_model_and_prompt_mismatch(tiny_model, tmp_path):
    model, tok = tiny_model
    samples = small_toy(1)
    first = run_task(TOY, samples, tmp_path, LoadedModel.of(model, tok, TEMPLATE), batch_size=8, progress=False)
    again = run_task(TOY, samples, tmp_path)  # no model: score what is saved
    assert again.metrics == first.metrics
    other = [Sample(s.id, s.prompt + " Be brief.", s.image, s.truth, s.max_new_tokens) for s in samples]
    with pytest.raises(ValueError, match="another --out folder"):
        run_task(TOY, other, tmp_path)


def test_missing_image_is_counted_and_skipped(tiny_model, tmp_path):
    model, tok = tiny_model
    pope = get_task("pope")
    ok = Image.new("RGB", (16, 16))
    samples = [
        Sample("random/1", "Is there a dog?", lambda: ok, {"split": "random", "label": "yes"}, 4),
        Sample(
            "random/2",
            "Is there a cat?",
            lambda: Image.open(tmp_path / "nope.jpg"),
            {"split": "random", "label": "no"},
            4,
        ),
    ]
    res = run_task(pope, samples, tmp_path, LoadedModel.of(model, tok, TEMPLATE), progress=False)
    assert res.metrics["skipped_images"] == 1 and res.metrics["n_answered"] == 1
    assert list(read_predictions(tmp_path / "predictions.jsonl")) == ["random/1"]


def test_parse_models_and_unknown_task():
    assert parse_models(["runs/a/model-stage1", "s2=runs/b"]) == {"model-stage1": "runs/a/model-stage1", "s2": "runs/b"}
    with pytest.raises(ValueError, match="two models named"):
        parse_models(["x/m", "y/m"])
    with pytest.raises(KeyError, match="unknown evaluation task 'nope'"):
        get_task("nope")


def test_cli_eval_toy_default_two_models_one_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    main(
        [
            "eval",
            "--model",
            f"first={tiny_dir}",
            "--model",
            f"second={tiny_dir}",
            "--n-scenes",
            "1",
            "--out",
            str(out),
            "--batch-size",
            "16",
        ]
    )
    printed = capsys.readouterr().out
    assert '"first"' in printed and f"report: {out / 'report.md'}" in printed
    report = (out / "report.md").read_text()
    assert "| metric | first | second |" in report and "| CHAIRi, short prompt |" in report
    assert "Observations" in report and (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("first", "second"):
        assert json.loads((out / name / "metrics.json").read_text())["n_scenes"] == 1
    # same model twice: same predictions
    assert (out / "first" / "predictions.jsonl").read_text() == (out / "second" / "predictions.jsonl").read_text()
    main(["eval", "--model", f"first={tiny_dir}", "--n-scenes", "1", "--out", str(out), "--rescore"])


def test_cli_eval_pope_from_files_and_bad_data(tiny_dir, tmp_path, capsys):
    (tmp_path / "val2014").mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "val2014" / "a.jpg")
    lines = [
        json.dumps({"question_id": i, "image": "a.jpg", "text": f"Is there a {o} in the image?", "label": label})
        for i, (o, label) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "no")])
    ]
    (tmp_path / "coco_pope_random.json").write_text("\n".join(lines))
    out = tmp_path / "eval"
    main(["eval", "--model", str(tiny_dir), "--task", "pope", "--data", str(tmp_path), "--out", str(out)])
    metrics = json.loads((out / "tiny_model" / "metrics.json").read_text())
    assert metrics["random"]["n"] == 3 and 0.0 <= metrics["random"]["accuracy"] <= 1.0
    assert "| random: accuracy |" in (out / "report.md").read_text()
    with pytest.raises(SystemExit) as err:  # a clear error naming what is missing, not a traceback
        main(
            ["eval", "--model", str(tiny_dir), "--task", "pope", "--data", str(tmp_path / "nowhere"), "--out", str(out)]
        )
    assert "no POPE files" in str(err.value.code)
    with pytest.raises(SystemExit) as err:
        main(["eval", "--model", str(tiny_dir), "--task", "mme", "--out", str(out)])
    assert "needs --data" in str(err.value.code)
