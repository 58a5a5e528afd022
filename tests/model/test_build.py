import pytest
import torch
from mm_helpers import ARCHS, make_inputs
from transformers import (
    Blip2ForConditionalGeneration,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from mmalign.model import (
    IMAGE_TOKEN,
    MiniGPT4PatchForConditionalGeneration,
    build_model,
    check_image_tokens,
    image_processor_for,
    num_image_tokens,
)

CLASSES = {
    "minigpt4": Blip2ForConditionalGeneration,
    "minigpt4_patch": MiniGPT4PatchForConditionalGeneration,
    "llava": LlavaForConditionalGeneration,
}


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_forward_loss_and_token_count(build, arch):
    model, tok = build(arch)
    assert type(model) is CLASSES[arch]
    assert not any(m.training for m in model.modules())  # eval, like from_pretrained
    assert model.config.image_token_index == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert IMAGE_TOKEN in tok.all_special_tokens
    assert model.config.text_config.pad_token_id == tok.pad_token_id
    # 32 px / patch 8 = 16 patches, CLS dropped; patch arch merges 4; blip-2 has 8 queries
    assert num_image_tokens(model.config) == {"minigpt4": 8, "minigpt4_patch": 4, "llava": 16}[arch]
    inputs = make_inputs(model, tok)
    check_image_tokens(inputs["input_ids"], 2, model.config)
    out = model(**inputs)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert not any(t.is_meta for t in model.state_dict().values())


def test_image_token_count_follows_strategy(build):
    model, _ = build("llava", vision_feature_select_strategy="full")
    assert num_image_tokens(model.config) == 17  # CLS kept


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_number_of_image_tokens_raises(build, arch):
    model, tok = build(arch)
    inputs = make_inputs(model, tok)
    ids = inputs["input_ids"].clone()
    ids[0, torch.nonzero(ids[0] == model.config.image_token_index)[0]] = tok.unk_token_id  # one fewer
    with pytest.raises(ValueError, match=r"2 image\(s\) x \d+ tokens"):
        check_image_tokens(ids, 2, model.config)
    if arch != "minigpt4":  # Llava's own check (Blip2 would silently scatter a prefix)
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            model(**{**inputs, "input_ids": ids})


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_same_with_and_without_cache(build, arch):
    model, tok = build(arch)
    inputs = make_inputs(model, tok)
    inputs.pop("labels")
    if arch == "minigpt4":
        check_image_tokens(inputs["input_ids"], 2, model.config)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kw)
        uncached = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] - inputs["input_ids"].shape[1] == 6


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_generates_like_single_prompts(build, arch):
    model, tok = build(arch)
    image = [model.config.image_token_index] * num_image_tokens(model.config)
    rows = [
        [tok.bos_token_id, *image, *tok("a red circle above", add_special_tokens=False)["input_ids"]],
        [tok.bos_token_id, *image, *tok("a red", add_special_tokens=False)["input_ids"]],
    ]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(2, 3, 32, 32)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kw)[:, -5:]
        for i, row in enumerate(rows):
            single = model.generate(input_ids=torch.tensor([row]), pixel_values=pixels[i : i + 1], **kw)
            assert torch.equal(batched[i], single[0, -5:]), i


def test_adds_image_token_and_resizes_embeddings(tiny_spec, make_tiny_tokenizer):
    tok = make_tiny_tokenizer(image_token=False)
    vocab = len(tok)
    model, tok = build_model(tiny_spec("llava", tokenizer=tok))
    assert len(tok) == vocab + 1 and IMAGE_TOKEN in tok.all_special_tokens
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.config.text_config.vocab_size == len(tok)
    assert model.config.image_token_index == vocab


def test_loads_pretrained_parts_from_folders(tmp_path, build, tiny_spec):
    """Vision + Q-Former + query tokens from a Blip2 folder, LLM + tokenizer from a Llama folder."""
    donor, tok = build("minigpt4", seed=1)
    donor.save_pretrained(tmp_path / "blip2")
    lm = LlamaForCausalLM(donor.config.text_config)
    lm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    blip2, llm = str(tmp_path / "blip2"), str(tmp_path / "llm")
    spec = tiny_spec("minigpt4", vision=None, qformer=blip2, llm=llm, tokenizer=None)
    torch.manual_seed(2)
    model, tok2 = build_model(spec)
    sd, donor_sd, lm_sd = model.state_dict(), donor.state_dict(), lm.state_dict()
    for k, v in donor_sd.items():
        if k.startswith(("vision_model.", "qformer.", "query_tokens")):
            assert torch.equal(sd[k], v), k
    for k, v in lm_sd.items():
        assert torch.equal(sd["language_model." + k], v), k
    assert tok2.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_index

    # a llava vision tower from a Blip2-less checkpoint: the llava donor's own folder
    llava, _ = build("llava", seed=3)
    llava.save_pretrained(tmp_path / "llava")
    torch.manual_seed(4)
    model, _ = build_model(tiny_spec("llava", vision=str(tmp_path / "llava")))
    for k, v in llava.state_dict().items():
        if k.startswith("model.vision_tower."):
            assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("arch", ARCHS)
def test_image_processor_matches_tower(build, arch):
    from PIL import Image

    model, _ = build(arch)
    proc = image_processor_for(model)
    out = proc(images=Image.new("RGB", (50, 40), (200, 10, 10)), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 32, 32)


def test_vision_tower_from_full_clip_bin_checkpoint(tmp_path, tiny_spec):
    """The usual real case: a whole CLIP repo (text tower too), here as pytorch_model.bin."""
    from transformers import CLIPConfig, CLIPModel

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8))
    clip.config.save_pretrained(tmp_path)
    torch.save(clip.state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = build_model(tiny_spec("llava", vision=str(tmp_path)))
    tower = model.model.vision_tower.state_dict()
    donor = clip.state_dict()
    assert tower and all(torch.equal(v, donor["vision_model." + k]) for k, v in tower.items())


def test_minigpt4_takes_qformer_from_a_blip2_vision_checkpoint(tmp_path, build, tiny_spec):
    donor, _ = build("minigpt4", seed=1)
    donor.save_pretrained(tmp_path / "blip2")
    model, _ = build_model(tiny_spec("minigpt4", vision=str(tmp_path / "blip2"), qformer=None))
    assert torch.equal(model.query_tokens, donor.query_tokens)
    for k, v in donor.qformer.state_dict().items():
        assert torch.equal(model.qformer.state_dict()[k], v), k


# --------------------------------------------------------------------------- quantized loading


def _linear_weights(model):
    return {n: type(m.weight).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _llm_bytes(model) -> int:
    from mmalign.model import weight_bytes

    return sum(weight_bytes(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _llm_layer(n))


def _llm_layer(name: str) -> bool:
    return ".layers." in name and "vision" not in name and "qformer" not in name


@pytest.mark.parametrize("arch", ARCHS)
def test_load_in_8bit_on_cpu_quantizes_the_llm_only(tmp_path, build, arch):
    from mmalign.model import export, load_model, weight_bytes

    model, tok = build(arch)
    export(model, tok, tmp_path, template="minigpt4_v0")
    q, _ = load_model(str(tmp_path), load_in="8bit")
    kinds = _linear_weights(q)
    assert kinds and all(("Int8" in k) == _llm_layer(n) for n, k in kinds.items()), kinds  # torchao int8
    assert weight_bytes(q) < weight_bytes(model)
    assert _llm_bytes(q) < 0.3 * _llm_bytes(model)  # int8 + one scale per row vs float32
    inputs = make_inputs(model, tok)
    with torch.no_grad():
        ref, got = model(**inputs).logits, q(**inputs).logits
    assert ((got - ref).abs().max() / ref.std()).item() < 0.1


def test_load_in_4bit_on_cpu_uses_bitsandbytes_nf4(tmp_path, build):
    from mmalign.model import export, load_model

    llm = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=400,
        max_position_embeddings=256,
    )
    model, tok = build("minigpt4_patch", llm={**llm, "vocab_size": 405})
    export(model, tok, tmp_path, template="minigpt4_v0")
    q, _ = load_model(str(tmp_path), load_in="4bit")
    kinds = _linear_weights(q)
    assert all((k == "Params4bit") == _llm_layer(n) for n, k in kinds.items()), kinds
    assert _llm_bytes(q) < 0.2 * _llm_bytes(model)  # 4 bits + block scales vs float32
    inputs = make_inputs(model, tok)
    with torch.no_grad():
        ref, got = model(**inputs).logits, q(**inputs).logits
    assert torch.isfinite(got).all()
    corr = torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1].item()
    assert corr > 0.9, corr  # NF4 is coarse, yet the logits still follow the float32 ones


def test_load_in_4bit_on_cpu_refuses_widths_bitsandbytes_cannot_pack(tmp_path, build):
    from mmalign.model import export, load_model

    model, tok = build("minigpt4_patch")  # hidden 32
    export(model, tok, tmp_path, template="minigpt4_v0")
    with pytest.raises(ValueError, match="divisible by 64"):
        load_model(str(tmp_path), load_in="4bit")


def test_cuda_quantization_is_bitsandbytes_with_vision_and_projector_kept(build):
    from transformers import BitsAndBytesConfig

    from mmalign.model import quantization_config

    for arch, kept in [("minigpt4", "qformer"), ("llava", "model.multi_modal_projector")]:
        model, _ = build(arch)
        for load_in in ("8bit", "4bit"):
            cfg = quantization_config(model.config, load_in, "cuda:0", torch.float16)
            assert isinstance(cfg, BitsAndBytesConfig) and kept in cfg.llm_int8_skip_modules
            assert cfg.load_in_8bit == (load_in == "8bit") and cfg.load_in_4bit == (load_in == "4bit")
    with pytest.raises(ValueError, match="load_in"):
        quantization_config(model.config, "3bit", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 8-bit / 4-bit needs CUDA")
@pytest.mark.parametrize("load_in", ["8bit", "4bit"])
def test_load_in_bitsandbytes_on_cuda(tmp_path, build, load_in):
    from mmalign.model import export, load_model

    llm = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=405,
        max_position_embeddings=256,
    )
    model, tok = build("llava", llm=llm)
    export(model, tok, tmp_path, template="minigpt4_v0")
    q, _ = load_model(str(tmp_path), load_in=load_in, device="cuda", dtype=torch.float16)
    kinds = _linear_weights(q)
    assert all((k in ("Int8Params", "Params4bit")) == _llm_layer(n) for n, k in kinds.items()), kinds
    inputs = {k: v.to("cuda") for k, v in make_inputs(model, tok).items()}
    inputs["pixel_values"] = inputs["pixel_values"].half()
    out = q.generate(**{k: v for k, v in inputs.items() if k != "labels"}, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
