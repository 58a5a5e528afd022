import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
    # what a Hub user runs: AutoProcessor -> apply_chat_template -> processor(images, text) -> generate
    import json, sys, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def run(folder):
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        with torch.no_grad():
            torch.save(model(**torch.load(f"{folder}/inputs.pt")).logits, f"{folder}/plain_logits.pt")
        processor = AutoProcessor.from_pretrained(folder)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=Image.open(f"{folder}/image.png"), text=text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        prompt = inputs["input_ids"][0]
        new = out[0, len(prompt) :] if torch.equal(out[0, : len(prompt)], prompt) else out[0]  # prompt + answer
        result = {"input_ids": prompt.tolist(), "answer_ids": new.tolist(), "type": type(model).__name__}
        torch.save(inputs["pixel_values"], f"{folder}/plain_pixels.pt")
        return result

    folders = json.loads(sys.argv[1])
    results = {arch: run(folders[arch]) for arch in ("minigpt4", "llava")}
    assert not any(m == "mmalign" or m.startswith("mmalign.") for m in sys.modules), "mmalign was imported"
    import mmalign.model  # registers minigpt4_patch with the Auto classes
    results["minigpt4_patch"] = run(folders["minigpt4_patch"])
    print(json.dumps(results))
    """
)
TEMPLATES = {"minigpt4": "minigpt4_v0", "llava": "vicuna_v1", "minigpt4_patch": "llama2"}
TRANSFORMS = {"minigpt4": "resize", "llava": "pad_to_square", "minigpt4_patch": "resize"}


def _bos_adding_tokenizer(make_tiny_tokenizer):
    """Like Llama's: the tokenizer adds BOS itself (the exported template writes it too)."""
    tok = make_tiny_tokenizer()
    tok.add_bos_token = True
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


def test_exported_folders_answer_like_mmalign_chat_in_plain_transformers(tmp_path, tiny_spec, make_tiny_tokenizer):
    """One BOS, mmalign's prompt ids and pixels, and ``ChatSession``'s greedy answer, in a process
    that never imports mmalign (Blip2, Llava) or only ``mmalign.model`` (minigpt4_patch)."""
    from mmalign.chat.session import ChatSession
    from mmalign.model import LoadedModel, build_model
    from mmalign.prompts import strip_stop

    rng = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 255, (40, 64, 3), generator=rng, dtype=torch.uint8).numpy())
    folders, expected, sessions = {}, {}, {}
    for arch in ARCHS:
        torch.manual_seed(0)
        tok = _bos_adding_tokenizer(make_tiny_tokenizer)
        model, tok = build_model(tiny_spec(arch, tokenizer=tok, llm=_peaked_llm(len(tok))))
        inputs = make_inputs(model, tok)
        inputs.pop("labels")
        folder = export(model, tok, tmp_path / arch, template=TEMPLATES[arch], image_transform=TRANSFORMS[arch])
        torch.save(inputs, folder / "inputs.pt")
        image.save(folder / "image.png")
        folders[arch], expected[arch] = str(folder), _logits(model, inputs)
        assert tok("a")["input_ids"][0] == tok.bos_token_id  # the caller's tokenizer is left as it was
        session = ChatSession(LoadedModel.load(folder))
        session.set_image(Image.open(folder / "image.png"))
        sessions[arch] = (session, "".join(session.ask("What is it?", max_new_tokens=8, do_sample=False)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # for `import mmalign.model` only
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_HF, json.dumps(folders)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for arch in ARCHS:
        plain, (session, answer) = results[arch], sessions[arch]
        tok = session.tokenizer
        assert plain["input_ids"].count(tok.bos_token_id) == 1, arch
        assert plain["input_ids"] == session.ids[: len(plain["input_ids"])], arch  # mmalign's prompt ids
        torch.testing.assert_close(
            torch.load(Path(folders[arch]) / "plain_pixels.pt"), session.loaded.pixel_values([session.images[0]])
        )
        assert strip_stop(tok.decode(plain["answer_ids"], skip_special_tokens=True), session.template) == answer.strip()
        assert answer, arch  # a real answer was compared
        torch.testing.assert_close(torch.load(Path(folders[arch]) / "plain_logits.pt"), expected[arch])
    assert results["minigpt4"]["type"] == "Blip2ForConditionalGeneration"


def _peaked_llm(vocab_size: int) -> dict:
    """A tiny random Llama with larger weights, so greedy answers do not hinge on near-ties."""
    return dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        initializer_range=0.3,
    )


# llava-hf/llava-1.5-7b-hf's weight map (model.safetensors.index.json), layer numbers as N: what vLLM
# and transformers read
LLAVA_HF_LAYOUT = {
    "language_model.lm_head.weight",
    "language_model.model.embed_tokens.weight",
    "language_model.model.norm.weight",
    *(f"language_model.model.layers.N.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")),
    *(f"language_model.model.layers.N.mlp.{n}_proj.weight" for n in ("gate", "up", "down")),
    *(f"language_model.model.layers.N.self_attn.{n}_proj.weight" for n in "qkvo"),
    *(f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")),
    "vision_tower.vision_model.embeddings.class_embedding",
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.embeddings.position_embedding.weight",
    *(f"vision_tower.vision_model.{n}.{p}" for n in ("pre_layrnorm", "post_layernorm") for p in ("weight", "bias")),
    *(
        f"vision_tower.vision_model.encoder.layers.N.{n}.{p}"
        for n in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2", *(f"self_attn.{x}_proj" for x in "qkv"))
        for p in ("weight", "bias")
    ),
    *(f"vision_tower.vision_model.encoder.layers.N.self_attn.out_proj.{p}" for p in ("weight", "bias")),
}


def test_llava_export_writes_the_llava_hf_tensor_layout(tmp_path, build):
    import re

    model, tok = build("llava")
    export(model, tok, tmp_path / "out")
    names = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert {re.sub(r"\.\d+\.", ".N.", n) for n in names} == LLAVA_HF_LAYOUT
    loaded, _ = load_model(str(tmp_path / "out"))  # transformers (and so mmalign) read it back
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    export(loaded, tok, tmp_path / "again")  # a model transformers loaded is written the same way
    assert set(load_file(str(tmp_path / "again" / "model.safetensors"))) == names


def test_exported_configs_name_their_text_architecture(tmp_path, build):
    for arch in ("minigpt4", "llava"):
        model, tok = build(arch)
        export(model, tok, tmp_path / arch)
        config = json.loads((tmp_path / arch / "config.json").read_text())
        assert config["text_config"]["architectures"] == ["LlamaForCausalLM"], arch


def test_export_records_the_eval_transform_that_loaded_models_apply(tmp_path, build):
    from mmalign.model import LoadedModel

    model, tok = build("llava")
    export(model, tok, tmp_path / "pad", image_transform="pad_to_square")
    export(model, tok, tmp_path / "default")
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    padded, cropped = LoadedModel.load(tmp_path / "pad"), LoadedModel.load(tmp_path / "default")
    assert (padded.image_transform.name, cropped.image_transform.name) == ("pad_to_square", "center_crop")
    assert not torch.equal(padded.pixel_values([image]), cropped.pixel_values([image]))
    hf = AutoImageProcessor.from_pretrained(tmp_path / "pad")
    assert hf.do_pad  # LlavaImageProcessor: the exported processor pads too
    torch.testing.assert_close(hf(images=image, return_tensors="pt")["pixel_values"], padded.pixel_values([image]))
    meta = json.loads((tmp_path / "pad" / "mmalign.json").read_text())
    del meta["image_transform"]  # a folder written before transforms were recorded
    (tmp_path / "pad" / "mmalign.json").write_text(json.dumps(meta))
    assert LoadedModel.load(tmp_path / "pad").image_transform.name == "center_crop"
    with pytest.raises(ValueError, match="eval image transform 'random_resized_crop'"):
        export(model, tok, tmp_path / "bad", image_transform="random_resized_crop")


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
