"""The lmms-eval adapter: requests shaped like lmms-eval's `Instance`s (no lmms-eval needed), then
lmms-eval's own `Instance`s, model construction and multiple-choice selection code."""

import importlib
import os
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


def _ranked_tokens(model, tok, template, question, image):
    """Single-token texts (no leading space) from most to least likely as the answer's first token."""
    from mmalign.model import num_image_tokens
    from mmalign.prompts import build_generation_prompt, training_system, user_with_image

    turns = [{"role": "user", "content": user_with_image(template, question)}]
    prompt = build_generation_prompt(
        tok, template, turns, num_image_tokens(model.config), system=training_system(template)
    )
    pixel = image_transform_for(model)(image).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt]), pixel_values=pixel).logits[0, -1]
    texts = [tok.decode([t]) for t in logits.argsort(descending=True).tolist()]
    ranked = [(t, x) for t, x in zip(logits.argsort(descending=True).tolist(), texts) if x.strip() == x and x.isalpha()]
    return [x for t, x in ranked if tok.encode(x, add_special_tokens=False) == [t]], torch.log_softmax(logits, -1)


def test_loglikelihood_is_a_loss_with_greedy_flag(adapter, tiny_model):
    model, tok = tiny_model
    ranked, logp = _ranked_tokens(model, tok, "minigpt4_v0", DOCS[0]["q"], DOCS[0]["image"])
    best, other = ranked[0], ranked[5]

    def req(cont):
        return FakeInstance("loglikelihood", ("<image>\n" + DOCS[0]["q"], cont, doc_to_visual, 0, "fake", "test"))

    (loss_best, greedy_best), (loss_other, greedy_other), (loss_doc, _), (loss_spaced, _) = adapter.loglikelihood(
        [req(best), req(other), req(lambda doc: best), req(" " + best)]
    )  # a doc_to_target callable works too; lmms-eval's " " delimiter is the template's own
    assert greedy_best and not greedy_other
    assert loss_best < loss_other  # lower is better, as lmms-eval's argmin expects
    assert loss_best == pytest.approx(-logp[tok.convert_tokens_to_ids(tok.tokenize(best))[0]].item(), abs=1e-4)
    assert loss_doc == pytest.approx(loss_best) and loss_spaced == pytest.approx(loss_best)


def test_loglikelihood_vicuna_scores_the_trained_answer_not_a_double_space(tiny_spec):
    """vicuna_v1 prompts end with "ASSISTANT:" and answers are trained as " A": lmms-eval's " A"
    must score " A" (one space), whatever the delimiter, and a two-token continuation is a mean."""
    from mmalign.model import build_model, num_image_tokens
    from mmalign.prompts import build_generation_prompt, training_system, user_with_image

    torch.manual_seed(0)
    model, tok = build_model(tiny_spec("llava"))
    a = MMAlignLMMS(model=model, tokenizer=tok, template="vicuna_v1")
    a.task_dict = {"fake": {"test": DOCS}}
    turns = [{"role": "user", "content": user_with_image("vicuna_v1", DOCS[0]["q"])}]
    prompt = build_generation_prompt(
        tok, "vicuna_v1", turns, num_image_tokens(model.config), system=training_system("vicuna_v1")
    )
    pixel = image_transform_for(model)(DOCS[0]["image"]).unsqueeze(0)

    def mean_nll(text):
        cont = tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + cont]), pixel_values=pixel).logits[0]
        return torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(cont)).item()

    ctx = "<image>\n" + DOCS[0]["q"]
    got = [
        loss
        for loss, _ in a.loglikelihood(
            [
                FakeInstance("loglikelihood", (ctx, c, doc_to_visual, 0, "fake", "test"))
                for c in (" red", "red", " a red circle")
            ]
        )
    ]
    assert got[0] == pytest.approx(mean_nll(" red"), abs=1e-5) and got[1] == pytest.approx(got[0])
    assert got[0] != pytest.approx(mean_nll("  red"), abs=1e-5)  # the double space the old adapter scored
    assert len(tok.encode(" a red circle", add_special_tokens=False)) > 1
    assert got[2] == pytest.approx(mean_nll(" a red circle"), abs=1e-5)


def test_unconditional_two_argument_requests(adapter):
    """lmms-eval's acc_mutual_info adds ("", choice) requests: two arguments, no image."""
    ((loss, greedy),) = adapter.loglikelihood([FakeInstance("loglikelihood", ("", " red"))])
    assert loss > 0 and isinstance(greedy, bool)


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


def test_model_args_strings_and_unknown_keys(tiny_dir, caplog):
    a = lmms_adapter.MMAlignLMMS(pretrained=str(tiny_dir), batch_size="4", device="cpu")
    assert a.template == "minigpt4_v0" and a.batch_size == 4
    with pytest.raises(ValueError, match="pretrained"):
        lmms_adapter.MMAlignLMMS()
    with pytest.raises(ValueError, match="number for batch_size"):
        lmms_adapter.MMAlignLMMS(pretrained=str(tiny_dir), batch_size="auto")
    with caplog.at_level("WARNING"):
        lmms_adapter.MMAlignLMMS(pretrained=str(tiny_dir), max_batch_size=None, pretrainde="typo")
    assert "pretrainde" in caplog.text


# ---------------------------------------------------------------------------------------------
# against lmms-eval itself (installed --no-deps in CI: .ci/run)


def _lmms_eval(module):
    """lmms-eval's module; CI installs it, so there a missing one fails instead of skipping."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def test_lmms_eval_builds_it_with_batch_size_in_both_places(tiny_dir):
    """lmms-eval always adds its own --batch_size to --model_args: `batch_size=16` in both used
    to raise "got multiple values for keyword argument 'batch_size'"."""
    _lmms_eval("lmms_eval.api.model")
    a = MMAlignLMMS.create_from_arg_string(
        f"pretrained={tiny_dir},batch_size=16,device=cpu", {"batch_size": "1", "max_batch_size": None, "device": "cpu"}
    )
    assert a.batch_size == 16 and a.template == "minigpt4_v0"
    assert MMAlignLMMS.create_from_arg_string(f"pretrained={tiny_dir}", {"batch_size": "4"}).batch_size == 4


class _ChoiceTask:
    """The attributes lmms-eval's `ConfigurableTask.construct_requests` / `process_results` read
    for an `output_type: multiple_choice` task; their code runs unchanged on it."""

    OUTPUT_TYPE = "multiple_choice"
    multiple_input = False
    multiple_target = False

    def __init__(self, docs, choices):
        self.dataset = {"test": docs}
        self.config = types.SimpleNamespace(task="fake", target_delimiter=" ", process_results=None)
        self._metric_fn_list = {"acc": None, "acc_norm": None}
        self._choices = choices

    def doc_to_choice(self, doc):
        return self._choices

    def doc_to_target(self, doc):
        return doc["gold"]

    @staticmethod
    def doc_to_visual(doc):
        return [doc["image"]]


def test_lmms_eval_multiple_choice_picks_the_most_likely_choice(adapter, tiny_model):
    """lmms-eval's own Instances and selection code (argmin over what loglikelihood returns)
    on the adapter's outputs: the choice the model finds most likely is picked."""
    task_module = _lmms_eval("lmms_eval.api.task")
    model, tok = tiny_model
    ranked, _ = _ranked_tokens(model, tok, "minigpt4_v0", DOCS[0]["q"], DOCS[0]["image"])
    choices = [ranked[7], ranked[0], ranked[3]]  # the most likely in the middle
    docs = [dict(DOCS[0], gold=1), dict(DOCS[0], gold=0)]
    task = _ChoiceTask(docs, choices)
    adapter.task_dict = {"fake": {"test": docs}}
    for doc_id, doc in enumerate(docs):
        meta = {"task": "fake", "doc_id": doc_id, "repeats": 1, "split": "test"}
        reqs = task_module.ConfigurableTask.construct_requests(
            task, doc_id=doc_id, ctx="<image>\n" + doc["q"], metadata=meta
        )
        assert all(isinstance(r, task_module.Instance) for r in reqs) and reqs[0].args[1] == " " + choices[0]
        results = adapter.loglikelihood(reqs)
        scores = task_module.ConfigurableTask.process_results.__wrapped__(task, doc, results)
        assert scores["acc"] == float(doc["gold"] == 1)  # right for gold 1, wrong for gold 0
