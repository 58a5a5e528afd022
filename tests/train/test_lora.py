"""LoRA through peft: what trains (counted by hand from the shapes), merged export that plain
transformers reloads with the same logits, and a LoRA run end to end (train -> CLI export)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import caption_data, config
from transformers import LlavaForConditionalGeneration

from mmalign.cli import main
from mmalign.config import TrainConfig, to_dict
from mmalign.model import apply_freeze, build_model, export
from mmalign.model.checkpoint import WEIGHTS
from mmalign.train.lora import apply_lora, lora_target_modules
from mmalign.train.stage import train
from mmalign.train.state import STATE_FILE

# tiny LLM (tests/conftest.py): width 32, MLP 64, 4 heads of 8, 2 KV heads -> k/v project to 16; 2 layers
H, MLP, KV, LAYERS = 32, 64, 16, 2
LINEARS = {
    "q_proj": (H, H),
    "k_proj": (H, KV),
    "v_proj": (H, KV),
    "o_proj": (H, H),
    "gate_proj": (H, MLP),
    "up_proj": (H, MLP),
    "down_proj": (MLP, H),
}
LLAVA_PROJECTOR = 2 * (32 * H + H)  # linear_1 (vision width 32 -> 32) + linear_2 (32 -> 32), with biases


def _llava(tiny_spec):
    torch.manual_seed(0)
    return build_model(tiny_spec("llava"))


def _inputs(model, tok):
    from mm_helpers import make_inputs  # tests/model helper (a unique module name)

    inputs = make_inputs(model, tok)
    inputs.pop("labels")
    return inputs


@pytest.fixture(autouse=True)
def _model_helpers_on_path(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "model"))


@pytest.mark.parametrize("target, names", [("all-linear", list(LINEARS)), ("q_proj,v_proj", ["q_proj", "v_proj"])])
def test_lora_trains_adapters_plus_projector_counted_from_shapes(tiny_spec, target, names):
    model, _ = _llava(tiny_spec)
    apply_freeze(model, "projector")
    r = 4
    apply_lora(model, TrainConfig(lora_r=r, lora_alpha=8, lora_target=target))

    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    by_hand = LAYERS * sum(r * (fan_in + fan_out) for name, (fan_in, fan_out) in LINEARS.items() if name in names)
    assert sum(trainable.values()) == by_hand + LLAVA_PROJECTOR
    lora = [n for n in trainable if ".lora_" in n]
    assert len(lora) == LAYERS * len(names) * 2 and all(n.startswith("model.language_model.layers.") for n in lora)
    assert {n for n in trainable if ".lora_" not in n} == {
        f"model.multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")
    }
    # the adapted base weights, the vision tower and lm_head stay frozen
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base_layer." in n or "vision_tower" in n)


def test_lora_targets_only_the_llm_and_names_bad_targets(tiny_spec):
    model, _ = _llava(tiny_spec)
    targets = lora_target_modules(model)
    assert len(targets) == LAYERS * len(LINEARS)
    assert all(t.startswith("model.language_model.") for t in targets) and not any("lm_head" in t for t in targets)
    with pytest.raises(ValueError, match=r"no LLM Linear layer named \['qkv'\]"):
        lora_target_modules(model, "q_proj,qkv")
    apply_freeze(model, "projector+llm")
    with pytest.raises(ValueError, match="trains LLM layers that LoRA adapts"):
        apply_lora(model, TrainConfig(lora_r=4, trainable="projector+llm"))


def test_merged_export_reloads_in_plain_transformers_with_the_same_logits(tmp_path, tiny_spec):
    model, tok = _llava(tiny_spec)
    inputs = _inputs(model, tok)
    with torch.no_grad():
        base = model(**inputs).logits
    apply_freeze(model, "projector")
    apply_lora(model, TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to say
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    model.eval()
    with torch.no_grad():
        unmerged = model(**inputs).logits
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapters matter

    export(model, tok, tmp_path / "merged")
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in saved)
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        reloaded = plain(**inputs).logits
    torch.testing.assert_close(reloaded, unmerged, rtol=1e-4, atol=1e-4)


def test_lora_run_trains_with_its_own_projector_lr_and_exports_merged(tmp_path, tiny_spec, model_dirs):
    model_dir = model_dirs("llava")
    data = caption_data(tmp_path / "data", n=4)
    out = tmp_path / "run"
    cfg = config(
        model_dir,
        data,
        out,
        "data.caption_format=plain",
        "train.trainable=projector",
        "train.lora_r=4",
        "train.lora_alpha=8",
        "train.projector_lr=5e-3",
        "train.lr=1e-3",
        "train.min_lr=1e-4",
        "train.max_steps=3",
        "train.save_every=3",
        "train.plot=false",
    )
    final = train(cfg)

    saved = load_file(str(final / WEIGHTS))
    lora = [k for k in saved if ".lora_" in k]
    assert len(lora) == LAYERS * len(LINEARS) * 2 and any(k.startswith("model.multi_modal_projector.") for k in saved)
    assert any(saved[k].abs().sum() > 0 for k in lora if ".lora_B." in k)  # the adapters trained
    groups = torch.load(final / STATE_FILE, weights_only=False)["optimizer"]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([1e-3, 5e-3])  # LLM (LoRA) vs projector

    yaml_cfg = tmp_path / "lora.yaml"
    import yaml

    yaml_cfg.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg)))))
    main(["export", str(yaml_cfg), "--checkpoint", str(final), "--out", str(tmp_path / "export")])
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export")
    state = plain.state_dict()
    assert not any("lora_" in k for k in state)
    pristine = LlavaForConditionalGeneration.from_pretrained(model_dir).state_dict()
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[q], pristine[q])  # the adapters were merged into the base weights


def test_quantized_base_is_for_lora_on_a_finished_folder(tmp_path, tiny_spec):
    from types import SimpleNamespace

    from mmalign.model import model_from_config
    from mmalign.train.lora import prepare_quantized

    recipe_cfg = SimpleNamespace(
        path=None,
        recipe="toy-llava",
        vision=None,
        llm=None,
        dtype="float32",
        device="cpu",
        attn_implementation=None,
        quantization="4bit",
    )
    with pytest.raises(ValueError, match="set model.path"):
        model_from_config(recipe_cfg)
    model, _ = _llava(tiny_spec)
    with pytest.raises(ValueError, match="set train.lora_r > 0"):
        prepare_quantized(model, TrainConfig(lora_r=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA's 4-bit base needs CUDA (bitsandbytes)")
def test_qlora_trains_adapters_on_a_4bit_base(tmp_path, tiny_spec, model_dirs):
    data = caption_data(tmp_path / "data", n=4)
    cfg = config(
        model_dirs("llava"),
        data,
        tmp_path / "run",
        "data.caption_format=plain",
        "model.device=cuda",
        "model.dtype=bfloat16",
        "model.quantization=4bit",
        "train.lora_r=4",
        "train.mixed_precision=bf16",
        "train.gradient_checkpointing=true",
        "train.max_steps=2",
        "train.save_every=2",
        "train.plot=false",
    )
    final = train(cfg)
    saved = load_file(str(final / WEIGHTS))
    assert any(".lora_B." in k and saved[k].abs().sum() > 0 for k in saved)
