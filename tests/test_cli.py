"""`mmalign <verb>` argument handling, run in-process on a tiny exported model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.model import build_model, export, image_processor_for, load_model, template_of


@pytest.fixture
def model_dir(tmp_path, tiny_spec) -> Path:
    torch.manual_seed(0)
    model, tok = build_model(tiny_spec("minigpt4_patch"))
    out = tmp_path / "tiny_model"
    export(model, tok, out, image_processor=image_processor_for(model), template="minigpt4_v0")
    return out


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "red.jpg"
    Image.new("RGB", (40, 40), (200, 20, 20)).save(path)
    return path


@pytest.fixture
def run_config(tmp_path, model_dir) -> Path:
    """A stage-1 YAML on two captioned images; max_steps is large on purpose (overrides cut it)."""
    (tmp_path / "images").mkdir()
    recs = []
    for i, (color, cap) in enumerate([((200, 20, 20), "a red circle"), ((20, 20, 200), "a blue square")]):
        Image.new("RGB", (40, 40), color).save(tmp_path / "images" / f"{i}.jpg")
        recs.append({"image": f"images/{i}.jpg", "caption": cap})
    (tmp_path / "caps.json").write_text(json.dumps(recs))
    cfg = {
        "model": {"path": str(model_dir)},
        "data": {"source": "captions", "path": str(tmp_path / "caps.json")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1000, "batch_size": 2, "log_every": 1},
    }
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_chat_scripted_questions_print_one_answer_each(model_dir, image, capsys):
    main(
        [
            "chat",
            "--model",
            str(model_dir),
            "--image",
            str(image),
            "--ask",
            "What is this?",
            "--ask",
            "And the color?",
            "--max-new-tokens",
            "4",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert [ln for ln in lines if ln.startswith("User:")] == ["User: What is this?", "User: And the color?"]
    answers = [i for i, ln in enumerate(lines) if ln.startswith("Assistant:")]
    assert len(answers) == 2
    assert lines.index("User: What is this?") < answers[0] < lines.index("User: And the color?") < answers[1]


def test_chat_beam_search_answers(model_dir, image, capsys):
    main(
        [
            "chat",
            "--model",
            str(model_dir),
            "--image",
            str(image),
            "--ask",
            "What is this?",
            "--num-beams",
            "2",
            "--max-new-tokens",
            "3",
        ]
    )
    assert sum(ln.startswith("Assistant:") for ln in capsys.readouterr().out.splitlines()) == 1


def test_chat_reads_commands_from_stdin(model_dir, image, capsys, monkeypatch):
    import io

    script = f"What is this?\n/image {image.parent / 'nope.jpg'}\n/reset\n\nHow many shapes?\n/quit\nnever asked\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    main(["chat", "--model", str(model_dir), "--image", str(image), "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert out.count("Assistant:") == 2
    assert "cannot open image" in out and "nope.jpg" in out


def test_train_with_dotted_overrides(run_config, tmp_path, capsys):
    main(["train", str(run_config), "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=1"])
    run = tmp_path / "run"
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str(run / "checkpoint-2")
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    saved = json.loads((run / "config.json").read_text())["train"]
    assert (saved["max_steps"], saved["save_every"], saved["batch_size"]) == (2, 1, 2)  # YAML + overrides


def test_export_overrides_after_options(run_config, tmp_path, capsys):
    main(["train", str(run_config), "train.max_steps=1", "train.save_every=1"])
    ckpt = tmp_path / "run" / "checkpoint-1"
    out = tmp_path / "exported"
    main(["export", str(run_config), "--checkpoint", str(ckpt), "--out", str(out), "data.template=llama2"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert template_of(out) == "llama2"  # the override after the options was applied
    model, _ = load_model(str(out))
    trained = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    assert trained and all(torch.equal(params[n], t) for n, t in trained.items())


def test_unknown_override_key_is_an_error_naming_it(run_config, tmp_path):
    with pytest.raises(SystemExit) as err:
        main(["train", str(run_config), "train.max_steps=2", "train.bogus_key=1"])
    assert isinstance(err.value.code, str) and re.search(r"train\.'?bogus_key", err.value.code)  # not a traceback
    assert not (tmp_path / "run").exists()  # failed before anything ran

    with pytest.raises(SystemExit) as err:
        main(["train", str(run_config), "train.max_steps=two"])
    assert isinstance(err.value.code, str) and "train.max_steps" in err.value.code


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "CONFIG", "--bogus"],
        ["train", "CONFIG", "train.max_steps=2", "--bogus=1"],
        ["chat", "--model", "MODEL", "--bogus"],
        ["chat", "--model", "MODEL", "train.max_steps=2"],  # chat takes no overrides
        ["eval", "--model", "MODEL", "stray"],
    ],
)
def test_unrecognized_arguments_exit(argv, run_config, model_dir, capsys):
    argv = [str(run_config) if x == "CONFIG" else str(model_dir) if x == "MODEL" else x for x in argv]
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_missing_verb_exits(capsys):
    with pytest.raises(SystemExit) as err:
        main([])
    assert err.value.code == 2


def test_serve_loads_the_model_and_starts_uvicorn(model_dir, monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port: started.update(app=app, host=host, port=port))
    main(["serve", "--model", str(model_dir), "--port", "8123", "--load-in", "8bit", "--served-name", "tiny"])
    assert started["host"] == "127.0.0.1" and started["port"] == 8123
    paths = {r.path for r in started["app"].routes}
    assert {"/v1/chat/completions", "/v1/models", "/health"} <= paths
    main(["serve", "--model", str(model_dir), "--attn-implementation", "eager", "--batch-wait-ms", "150"])
    worker = started["app"].state.worker
    assert worker.batch_wait_s == pytest.approx(0.15)
    assert worker.loaded.model.config.text_config._attn_implementation == "eager"
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(model_dir), "--load-in", "3bit"])
