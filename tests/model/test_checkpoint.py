import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from mm_helpers import ARCHS, make_inputs
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor

from mmalign.model import apply_freeze, export, load_model, load_trainable, save_trainable
from mmalign.model.checkpoint import WEIGHTS


def test_save_load_trainable_round_trip(tmp_path, build):
    a, tok = build("minigpt4", seed=1)
    apply_freeze(a, "projector")
    opt = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-2)
    a(**make_inputs(a, tok)).loss.backward()
    opt.step()
    save_trainable(a, tmp_path / "ck", extra={"step": 7, "optimizer": opt.state_dict()})
    saved = load_file(str(tmp_path / "ck" / WEIGHTS))
    assert set(saved) == {"language_projection.weight", "language_projection.bias"}
    meta = json.loads((tmp_path / "ck" / "trainable.json").read_text())
    assert meta["model_type"] == "blip-2"

    b, _ = build("minigpt4", seed=2)
    apply_freeze(b, "projector")
    extra = load_trainable(b, tmp_path / "ck")
    assert extra["step"] == 7 and "state" in extra["optimizer"]
    for n, p in b.named_parameters():
        if n.startswith("language_projection."):
            assert torch.equal(p, dict(a.named_parameters())[n])


def test_load_trainable_names_bad_keys(tmp_path, build):
    a, _ = build("llava")
    apply_freeze(a, "projector")
    save_trainable(a, tmp_path / "ck")
    tensors = load_file(str(tmp_path / "ck" / WEIGHTS))
    bad = {k.replace("linear_1", "linear_one"): v for k, v in tensors.items()}
    save_file(bad, str(tmp_path / "ck" / WEIGHTS))
    with pytest.raises(KeyError, match="linear_one") as err:
        load_trainable(a, tmp_path / "ck")
    assert "model.multi_modal_projector.linear_1.weight" in str(err.value)  # named as missing

    save_trainable(a, tmp_path / "ck2")
    apply_freeze(a, "projector+llm")  # now the LLM trains too: the file lacks it
    with pytest.raises(KeyError, match="missing .*model.language_model"):
        load_trainable(a, tmp_path / "ck2")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


PLAIN_HF = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, Blip2ForConditionalGeneration
    from PIL import Image
    root = sys.argv[1]
    for arch in ("minigpt4", "llava"):
        d = f"{root}/{arch}"
        model = AutoModelForImageTextToText.from_pretrained(d).eval()
        if arch == "minigpt4":
            assert type(model) is Blip2ForConditionalGeneration
        inputs = torch.load(f"{d}/inputs.pt")
        with torch.no_grad():
            torch.save(model(**inputs).logits, f"{d}/plain_logits.pt")
        if arch == "llava":  # the exported processor expands <image> to the model's count
            proc = AutoProcessor.from_pretrained(d)
            enc = proc(text="<image> a red circle", images=Image.new("RGB", (40, 40)), return_tensors="pt")
            n = int((enc["input_ids"] == model.config.image_token_index).sum())
            assert n == 16, n
            with torch.no_grad():
                model(**enc)
        print(arch, type(model).__module__)
    assert not any(m == "mmalign" or m.startswith("mmalign.") for m in sys.modules), "mmalign was imported"
    """
)


def test_export_reloads_with_plain_transformers(tmp_path, build):
    expected = {}
    for arch in ("minigpt4", "llava"):
        model, tok = build(arch)
        inputs = make_inputs(model, tok)
        inputs.pop("labels")
        export(model, tok, tmp_path / arch)
        torch.save(inputs, tmp_path / arch / "inputs.pt")
        expected[arch] = _logits(model, inputs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_HF, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "transformers.models.blip_2" in run.stdout and "transformers.models.llava" in run.stdout
    for arch, logits in expected.items():
        torch.testing.assert_close(torch.load(tmp_path / arch / "plain_logits.pt"), logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_then_load_model(tmp_path, build, arch):
    model, tok = build(arch)
    inputs = make_inputs(model, tok)
    export(model, tok, tmp_path / "out")
    loaded, tok2 = load_model(str(tmp_path / "out"))
    assert type(loaded) is type(model)
    assert tok2.convert_tokens_to_ids("<image>") == loaded.config.image_token_index
    torch.testing.assert_close(_logits(loaded.eval(), inputs), _logits(model, inputs))
    image_processor = AutoImageProcessor.from_pretrained(tmp_path / "out")  # nested in processor_config for llava
    assert image_processor(images=Image.new("RGB", (9, 9)), return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


def test_template_recorded_by_export(tmp_path, build):
    from mmalign.model import template_of

    model, tok = build("minigpt4_patch")
    export(model, tok, tmp_path / "a", template="minigpt4_v0")
    assert template_of(tmp_path / "a") == "minigpt4_v0"
    export(model, tok, tmp_path / "b")
    assert template_of(tmp_path / "b") == "llama2"  # the published default of the architecture


def test_model_from_config_loads_a_path(tmp_path, build):
    from types import SimpleNamespace

    from mmalign.model import model_from_config

    model, tok = build("llava")
    export(model, tok, tmp_path / "m")
    cfg = SimpleNamespace(
        path=str(tmp_path / "m"), recipe=None, dtype="bfloat16", device="cpu", attn_implementation=None
    )
    loaded, _ = model_from_config(cfg)
    assert type(loaded) is type(model) and loaded.dtype == torch.bfloat16
