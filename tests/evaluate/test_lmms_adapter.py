"""The lmms-eval adapter, without lmms-eval: requests shaped like lmms-eval's `Instance`s."""

import importlib
import sys
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.evaluate import lmms_adapter, runner
from mmalign.evaluate.lmms_adapter import MMAlignLMMS
from mmalign.model import LoadedModel, image_transform_for

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class FakeInstance:
    """lmms-eval's `Instance`: `request_type`, `arguments` (exposed as `.args`), `idx`, `metadata`."""

    request_type: str
    arguments: tuple
    idx: int = 0
    metadata: dict = field(default_factory=dict)

    @property
    def args(self):
        return self.arguments


DOCS = [
    {"image": Image.new("RGB", (20, 20), (200, 30, 30)), "q": "Is there a dog?"},
    {"image": Image.new("RGB", (20, 20), (30, 30, 200)), "q": "What colour is it?"},
    {"image": None, "q": "How many shapes?"},
]


def doc_to_visual(doc):
    return [doc["image"]] if doc["image"] is not None else []


def gen_request(i, **gen):
    ctx = f"<image>\n{DOCS[i]['q']}" if DOCS[i]["image"] is not None else DOCS[i]["q"]
    return FakeInstance("generate_until", (ctx, {"until": ["\n\n"], **gen}, doc_to_visual, i, "fake", "test"), i)


@pytest.fixture
def adapter(tiny_model):
    model, tok = tiny_model
    a = MMAlignLMMS(model=model, tokenizer=tok, template="minigpt4_v0", batch_size="2")
    a.task_dict = {"fake": {"test": DOCS}}  # what lmms-eval's evaluator sets
    return a


def test_generate_until_matches_the_runner_and_keeps_order(adapter, tiny_model):
    model, tok = tiny_model
    reqs = [gen_request(0, max_new_tokens=6), gen_request(1, max_new_tokens=4), gen_request(2, max_new_tokens=6)]
    out = adapter.generate_until(reqs)
    expect = [
        runner.generate(
            LoadedModel.of(model, tok, "minigpt4_v0"),
            [(DOCS[0]["image"], DOCS[0]["q"])],
            batch_size=1,
            max_new_tokens=6,
        )[0],
        runner.generate(
            LoadedModel.of(model, tok, "minigpt4_v0"),
            [(DOCS[1]["image"], DOCS[1]["q"])],
            batch_size=1,
            max_new_tokens=4,
        )[0],
        runner.generate(
            LoadedModel.of(model, tok, "minigpt4_v0"), [(None, DOCS[2]["q"])], batch_size=1, max_new_tokens=6
        )[0],
    ]
    assert out == [e.split("\n\n")[0].strip() for e in expect]
    assert len(set(out)) > 1


def test_generate_until_cuts_at_until_and_refuses_sampling(adapter, monkeypatch):
    answers = {DOCS[0]["q"]: "yes\n\nand more", "q": "no. STOP here"}  # one answer per question asked
    monkeypatch.setattr(runner, "generate", lambda *a, **k: [answers[q] for _, q in a[1]])
    reqs = [
        gen_request(0),
        FakeInstance("generate_until", ("<image>\nq", {"until": "STOP"}, doc_to_visual, 1, "fake", "test")),
    ]
    assert adapter.generate_until(reqs) == ["yes", "no."]  # each request cut at its own until
    with pytest.raises(ValueError, match="greedy only"):
        adapter.generate_until([gen_request(0, do_sample=True, temperature=0.7)])


def test_loglikelihood_greedy_flag_and_ordering(adapter, tiny_model):
    model, tok = tiny_model
    # the model's most likely first answer token after the prompt
    from mmalign.model import num_image_tokens
    from mmalign.prompts import build_generation_prompt, user_with_image

    turns = [{"role": "user", "content": user_with_image("minigpt4_v0", DOCS[0]["q"])}]
    prompt = build_generation_prompt(tok, "minigpt4_v0", turns, num_image_tokens(model.config), system=None)
    pixel = image_transform_for(model)(DOCS[0]["image"]).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt]), pixel_values=pixel).logits[0, -1]
    ranked = [
        t
        for t in logits.argsort(descending=True).tolist()
        if tok.encode(tok.decode([t]), add_special_tokens=False) == [t]
    ]
    best, other = tok.decode([ranked[0]]), tok.decode([ranked[5]])

    def req(cont):
        return FakeInstance("loglikelihood", ("<image>\n" + DOCS[0]["q"], cont, doc_to_visual, 0, "fake", "test"))

    (lp_best, greedy_best), (lp_other, greedy_other), (lp_doc, _) = adapter.loglikelihood(
        [req(best), req(other), req(lambda doc: best)]
    )  # a doc_to_target callable works too
    assert greedy_best and not greedy_other
    assert lp_best > lp_other
    assert lp_best == pytest.approx(torch.log_softmax(logits, -1)[ranked[0]].item(), abs=1e-4)
    assert lp_doc == pytest.approx(lp_best)


def test_entry_point_declared_and_manifest(monkeypatch):
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    assert eps == {"mmalign": "mmalign.evaluate.lmms_adapter:model_manifest"}
    module, attr = eps["mmalign"].split(":")
    target = getattr(importlib.import_module(module), attr)

    @dataclass(frozen=True)
    class ModelManifest:  # the shape of lmms_eval.models.registry_v2.ModelManifest
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None
        aliases: tuple = ()

    fake = types.ModuleType("lmms_eval.models.registry_v2")
    fake.ModelManifest = ModelManifest
    monkeypatch.setitem(sys.modules, "lmms_eval.models.registry_v2", fake)
    manifest = target()
    assert manifest.model_id == "mmalign" and manifest.chat_class_path is None
    mod, cls = manifest.simple_class_path.rsplit(".", 1)
    assert getattr(importlib.import_module(mod), cls) is MMAlignLMMS
    assert MMAlignLMMS.is_simple  # lmms-eval checks the flag against the manifest's model type
    assert "lmms" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_from_model_args_strings(tiny_dir):
    a = lmms_adapter.MMAlignLMMS(pretrained=str(tiny_dir), batch_size="4", device="cpu")
    assert a.template == "minigpt4_v0" and a.batch_size == 4
    with pytest.raises(ValueError, match="pretrained"):
        lmms_adapter.MMAlignLMMS()
