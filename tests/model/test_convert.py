"""Conversion of the published checkpoints, on tiny random files in each ORIGINAL layout.

Each test writes files with the original names and config fields (LAVIS eva_vit.py / Qformer.py
/ MiniGPT-4 minigpt4.py; LLaVA llava_arch.py / clip_encoder.py), converts them, loads the
result the way users do, and compares its logits with a reference forward written here from
the original tensors (plain torch for EVA, Q-Former and projectors; the LLM as the originals
run it: HF Llama on the original LLM tensors, with the image features spliced in).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Blip2ForConditionalGeneration,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from mmalign.model import (
    MiniGPT4PatchForConditionalGeneration,
    image_transform_of,
    load_model,
    num_image_tokens,
    template_of,
)
from mmalign.model.architectures import ARCHITECTURES
from mmalign.model.convert import (
    LLAVA_RENAMES,
    MINIGPT4_IGNORED,
    MINIGPT4_RENAMES,
    ConversionError,
    convert_llava,
    convert_minigpt4,
    original_name,
    rename,
)

EVA = dict(width=32, heads=2, patch=8, image=32, mlp=48, blocks=3)  # file has 3 blocks; 2 are used
KEEP = 2
QF = dict(width=24, heads=3, layers=3, ffn=40, queries=4)  # cross-attention in layers 0 and 2
LLM_WIDTH = 48
# The reference uses the originals' eps (ln_vision: 1e-5; HF's post_layernorm has the ViT's 1e-6),
# so outputs agree to ~1e-6 relative, not bit for bit.
TOL = dict(rtol=1e-4, atol=1e-4)


def rnd(*shape, scale=0.2):
    return torch.randn(*shape) * scale


def ln(width, prefix):
    return {prefix + "weight": 1 + rnd(width, scale=0.1), prefix + "bias": rnd(width, scale=0.1)}


def linear(out_f, in_f, prefix, bias=True):
    d = {prefix + "weight": rnd(out_f, in_f, scale=in_f**-0.5)}
    if bias:
        d[prefix + "bias"] = rnd(out_f, scale=0.1)
    return d


# --------------------------------------------------------------------------- original files


def eva_tensors(seed=0):
    """LAVIS eva_vit_g.pth layout (bare names, as MiniGPT-4's create_eva_vit_g loads them)."""
    torch.manual_seed(seed)
    w, p, n = EVA["width"], EVA["patch"], (EVA["image"] // EVA["patch"]) ** 2
    t = {"cls_token": rnd(1, 1, w), "pos_embed": rnd(1, n + 1, w)}
    t.update(linear(w, 3 * p * p, "patch_embed.proj."))
    t["patch_embed.proj.weight"] = t["patch_embed.proj.weight"].reshape(w, 3, p, p)
    for i in range(EVA["blocks"]):
        b = f"blocks.{i}."
        t.update(ln(w, b + "norm1."))
        t.update(linear(3 * w, w, b + "attn.qkv.", bias=False))
        t[b + "attn.q_bias"], t[b + "attn.v_bias"] = rnd(w, scale=0.1), rnd(w, scale=0.1)
        t.update(linear(w, w, b + "attn.proj."))
        t.update(ln(w, b + "norm2."))
        t.update(linear(EVA["mlp"], w, b + "mlp.fc1."))
        t.update(linear(w, EVA["mlp"], b + "mlp.fc2."))
    return t


def blip2_tensors(seed=1):
    """LAVIS blip2_pretrained_flant5xxl.pth 'model' dict: ln_vision, query tokens, Q-Former (with
    the text-side parts MiniGPT-4 deletes) and BLIP-2's own t5_proj. No visual_encoder."""
    torch.manual_seed(seed)
    w, ew = QF["width"], EVA["width"]
    t = {"query_tokens": rnd(1, QF["queries"], w, scale=0.5)}
    t.update(ln(ew, "ln_vision."))
    e = "Qformer.bert.embeddings."
    t.update(ln(w, e + "LayerNorm."))
    t[e + "word_embeddings.weight"], t[e + "position_embeddings.weight"] = rnd(30, w), rnd(16, w)
    t[e + "position_ids"] = torch.arange(16)[None]
    for i in range(QF["layers"]):
        pre = f"Qformer.bert.encoder.layer.{i}."
        for kind, kv_width in [("attention", w)] + ([("crossattention", ew)] if i % 2 == 0 else []):
            t.update(linear(w, w, f"{pre}{kind}.self.query."))
            t.update(linear(w, kv_width, f"{pre}{kind}.self.key."))
            t.update(linear(w, kv_width, f"{pre}{kind}.self.value."))
            t.update(linear(w, w, f"{pre}{kind}.output.dense."))
            t.update(ln(w, f"{pre}{kind}.output.LayerNorm."))
        for ffn in ("", "_query"):  # text FFN (unused by queries) and the query FFN
            t.update(linear(QF["ffn"], w, f"{pre}intermediate{ffn}.dense."))
            t.update(linear(w, QF["ffn"], f"{pre}output{ffn}.dense."))
            t.update(ln(w, f"{pre}output{ffn}.LayerNorm."))
    t.update(linear(w, w, "Qformer.cls.predictions.transform.dense."))
    t["Qformer.cls.predictions.bias"] = rnd(30)
    t.update(linear(64, w, "t5_proj."))
    return t


def tiny_llama(tok, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=LLM_WIDTH,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.1,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok(make_tiny_tokenizer):
    """The originals' tokenizer: no <image> (Vicuna's has none). Do not mutate."""
    return make_tiny_tokenizer(image_token=False)


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tok):
    """MiniGPT-4's files: eva_vit_g.pth, blip2 .pth, stage-2 .pth (Vicuna and Llama-2) and an LLM folder."""
    root = tmp_path_factory.mktemp("minigpt4_originals")
    llm = tiny_llama(tok, seed=3)
    llm.save_pretrained(root / "vicuna")
    tok.save_pretrained(root / "vicuna")
    torch.save(eva_tensors(), root / "eva_vit_g.pth")
    torch.save({"model": blip2_tensors(), "epoch": 9}, root / "blip2_pretrained_flant5xxl.pth")
    torch.manual_seed(4)
    proj = {"model": linear(LLM_WIDTH, QF["width"], "llama_proj."), "epoch": 3}
    torch.save(proj, root / "pretrained_minigpt4_7b.pth")
    torch.manual_seed(5)
    llama2_proj = {"model": linear(LLM_WIDTH, 4 * EVA["width"], "llama_proj.")}  # 4 ViT tokens joined
    torch.save(llama2_proj, root / "pretrained_minigpt4_llama2_7b.pth")
    return root


# --------------------------------------------------------------------------- reference forwards


def attend(q, k, v, heads):
    """Plain multi-head scaled dot-product attention, (b, n, heads * d) in and out."""
    split = lambda z: z.reshape(z.shape[0], z.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    att = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    return (att @ v).transpose(1, 2).flatten(2)


def ref_eva(t, pixels, layers=KEEP):
    """LAVIS EVA ViT forward (first ``layers`` blocks) then ln_vision (nn.LayerNorm, eps 1e-5)."""
    w, h = EVA["width"], EVA["heads"]
    x = F.conv2d(pixels, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=EVA["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([t["cls_token"].expand(x.shape[0], -1, -1), x], 1) + t["pos_embed"]
    for i in range(layers):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (w,), t[p + "norm1.weight"], t[p + "norm1.bias"], 1e-6)
        bias = torch.cat([t[p + "attn.q_bias"], torch.zeros(w), t[p + "attn.v_bias"]])
        qkv = F.linear(y, t[p + "attn.qkv.weight"], bias)
        att = attend(*qkv.split(w, -1), h)
        x = x + F.linear(att, t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
        y = F.layer_norm(x, (w,), t[p + "norm2.weight"], t[p + "norm2.bias"], 1e-6)
        y = F.linear(
            F.gelu(F.linear(y, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])),
            t[p + "mlp.fc2.weight"],
            t[p + "mlp.fc2.bias"],
        )
        x = x + y
    return x


def ref_qformer(t, image_embeds):
    """LAVIS Q-Former (BERT, post-LN) on the query tokens only, cross-attending every 2nd layer."""
    w, eps = QF["width"], 1e-12
    lin = lambda p: lambda z: F.linear(z, t[p + "weight"], t[p + "bias"])  # noqa: E731
    norm = lambda z, p: F.layer_norm(z, (w,), t[p + "weight"], t[p + "bias"], eps)  # noqa: E731
    x = norm(t["query_tokens"].expand(image_embeds.shape[0], -1, -1), "Qformer.bert.embeddings.LayerNorm.")
    for i in range(QF["layers"]):
        pre = f"Qformer.bert.encoder.layer.{i}."
        for kind, kv in [("attention", None)] + ([("crossattention", image_embeds)] if i % 2 == 0 else []):
            a = f"{pre}{kind}."
            kv = x if kv is None else kv
            ctx = attend(lin(a + "self.query.")(x), lin(a + "self.key.")(kv), lin(a + "self.value.")(kv), QF["heads"])
            x = norm(lin(a + "output.dense.")(ctx) + x, a + "output.LayerNorm.")
        y = lin(pre + "output_query.dense.")(F.gelu(lin(pre + "intermediate_query.dense.")(x)))
        x = norm(y + x, pre + "output_query.LayerNorm.")
    return x


def spliced_logits(llm, tok, before: str, features, after: str):
    """The originals' prompt wrapping: embed(BOS + before) + image features + embed(after)."""
    ids_a = torch.tensor([[tok.bos_token_id, *tok(before, add_special_tokens=False)["input_ids"]]])
    ids_b = torch.tensor([tok(after, add_special_tokens=False)["input_ids"]])
    emb = llm.get_input_embeddings()
    embeds = torch.cat([emb(ids_a), features, emb(ids_b)], 1)
    with torch.no_grad():
        return llm(inputs_embeds=embeds).logits, ids_a, ids_b


def converted_logits(model, ids_a, ids_b, pixels):
    n = num_image_tokens(model.config)
    ids = torch.cat([ids_a, torch.full((1, n), model.config.image_token_index), ids_b], 1)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


PROMPT = ("###Human: <Img>", "</Img> Describe this image in detail. ###Assistant: ")


# --------------------------------------------------------------------------- MiniGPT-4


@pytest.fixture(scope="module")
def minigpt4_dir(originals, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "minigpt4-7b"
    convert_minigpt4(
        originals / "pretrained_minigpt4_7b.pth",
        str(originals / "vicuna"),
        out,
        blip2=originals / "blip2_pretrained_flant5xxl.pth",
        vit=originals / "eva_vit_g.pth",
        vit_layers=KEEP,
        vit_heads=EVA["heads"],
        qformer_heads=QF["heads"],
        max_shard_size="40KB",
    )
    return out


def minigpt4_reference(originals, tok, pixels, projection="pretrained_minigpt4_7b.pth", qformer=True):
    eva = torch.load(originals / "eva_vit_g.pth")
    blip2 = torch.load(originals / "blip2_pretrained_flant5xxl.pth")["model"]
    proj = torch.load(originals / projection)["model"]
    vit = ref_eva(eva, pixels)
    if qformer:
        vit = F.layer_norm(vit, (EVA["width"],), blip2["ln_vision.weight"], blip2["ln_vision.bias"], 1e-5)
        feats = ref_qformer(blip2, vit)
    else:  # Llama-2 variant: ln_vision at its init (1, 0), CLS dropped, 4 consecutive tokens joined
        feats = F.layer_norm(vit, (EVA["width"],), eps=1e-5)[:, 1:]
        feats = feats.reshape(feats.shape[0], feats.shape[1] // 4, 4 * EVA["width"])
    feats = F.linear(feats, proj["llama_proj.weight"], proj["llama_proj.bias"])
    llm = LlamaForCausalLM.from_pretrained(originals / "vicuna").eval()
    return spliced_logits(llm, tok, PROMPT[0], feats, PROMPT[1])


def test_minigpt4_vicuna_matches_reference_forward(originals, tok, minigpt4_dir):
    torch.manual_seed(7)
    pixels = torch.randn(1, 3, EVA["image"], EVA["image"])
    ref, ids_a, ids_b = minigpt4_reference(originals, tok, pixels)
    model, tok2 = load_model(str(minigpt4_dir))
    assert type(model) is Blip2ForConditionalGeneration
    assert num_image_tokens(model.config) == QF["queries"]
    assert model.config.vision_config.num_hidden_layers == KEEP  # the file's 3rd block dropped
    assert model.config.qformer_config.cross_attention_frequency == 2
    out = converted_logits(model, ids_a, ids_b, pixels)
    torch.testing.assert_close(out[..., : ref.shape[-1]], ref, **TOL)
    # the folder: sharded safetensors, template marker + provenance, chat template on the tokenizer
    assert len(list(minigpt4_dir.glob("model-*.safetensors"))) > 1
    assert (minigpt4_dir / "model.safetensors.index.json").is_file()
    assert template_of(minigpt4_dir) == "minigpt4_v0"
    meta = json.loads((minigpt4_dir / "mmalign.json").read_text())
    assert meta["converted_from"]["vit"].endswith("eva_vit_g.pth")
    text = tok2.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.endswith("###Human: <Img><image></Img> Hi ###Assistant: ")


def test_minigpt4_from_hf_blip2_folder(originals, tok, minigpt4_dir, tmp_path):
    """--blip2 may be a HF Blip2 folder (e.g. Salesforce/blip2-flan-t5-xxl): ViT + Q-Former from it."""
    out = convert_minigpt4(
        originals / "pretrained_minigpt4_7b.pth", str(originals / "vicuna"), tmp_path / "m", blip2=str(minigpt4_dir)
    )
    torch.manual_seed(8)
    pixels = torch.randn(1, 3, EVA["image"], EVA["image"])
    ref, ids_a, ids_b = minigpt4_reference(originals, tok, pixels)
    model, _ = load_model(str(out))
    torch.testing.assert_close(converted_logits(model, ids_a, ids_b, pixels)[..., : ref.shape[-1]], ref, **TOL)


def test_minigpt4_llama2_variant_matches_reference_forward(originals, tok, tmp_path):
    out = convert_minigpt4(
        originals / "pretrained_minigpt4_llama2_7b.pth",
        str(originals / "vicuna"),
        tmp_path / "m",
        vit=originals / "eva_vit_g.pth",
        vit_layers=KEEP,
        vit_heads=EVA["heads"],
    )
    torch.manual_seed(9)
    pixels = torch.randn(1, 3, EVA["image"], EVA["image"])
    ref, ids_a, ids_b = minigpt4_reference(originals, tok, pixels, "pretrained_minigpt4_llama2_7b.pth", qformer=False)
    model, _ = load_model(str(out))
    assert type(model) is MiniGPT4PatchForConditionalGeneration
    assert num_image_tokens(model.config) == 4  # 16 patches / 4
    assert template_of(out) == "llama2"
    torch.testing.assert_close(converted_logits(model, ids_a, ids_b, pixels)[..., : ref.shape[-1]], ref, **TOL)


def _rewrite(src, dst, edit):
    obj = torch.load(src)
    edit(obj["model"] if "model" in obj else obj)
    torch.save(obj, dst)


PROJ, BLIP2, VIT = "pretrained_minigpt4_7b.pth", "blip2_pretrained_flant5xxl.pth", "eva_vit_g.pth"
MINIGPT4_BAD = {  # file, edit of its tensors, the error expected
    "missing": (PROJ, lambda m: m.pop("llama_proj.bias"), r"missing tensor\(s\): llama_proj\.bias"),
    "missing half of a fused bias": (
        VIT,
        lambda m: m.pop("blocks.1.attn.v_bias"),
        r"missing tensor: visual_encoder\.blocks\.1\.attn\.v_bias",
    ),
    "extra": (
        BLIP2,
        lambda m: m.update({"Qformer.bert.encoder.layer.0.attention.self.gate.weight": torch.zeros(2)}),
        r"no place for: Qformer\.bert\.encoder\.layer\.0\.attention\.self\.gate\.weight",
    ),
    "unknown": (BLIP2, lambda m: m.update({"Qformer.adapter.w": torch.zeros(2)}), r"unknown name.*Qformer\.adapter"),
    "wrong shape": (
        PROJ,
        lambda m: m.update({"llama_proj.weight": torch.zeros(LLM_WIDTH, 7)}),
        r"llama_proj\.weight: \[48, 7\], the model needs \[48, 24\]",
    ),
    "ViT in both files, shapes differ": (
        BLIP2,
        lambda m: m.update({"visual_encoder.cls_token": torch.zeros(1, 1, 7)}),
        r"visual_encoder\.cls_token is given twice with different shapes: \[1, 1, 32\] by .*eva_vit_g\.pth",
    ),
    "projection for another LLM": (
        PROJ,
        lambda m: m.update({"llama_proj.weight": torch.zeros(64, 24), "llama_proj.bias": torch.zeros(64)}),
        r"llama_proj\.weight: \[64, 24\], the model needs \[48, 24\]",
    ),
}


@pytest.mark.parametrize("case", list(MINIGPT4_BAD))
def test_minigpt4_bad_originals_name_the_tensor(originals, tmp_path, case):
    target, edit, pattern = MINIGPT4_BAD[case]
    files = {n: originals / n for n in (PROJ, BLIP2, VIT)}
    files[target] = tmp_path / target
    _rewrite(originals / target, files[target], edit)
    with pytest.raises(ConversionError, match=pattern):
        convert_minigpt4(
            files[PROJ],
            str(originals / "vicuna"),
            tmp_path / "out",
            blip2=files[BLIP2],
            vit=files[VIT],
            vit_layers=KEEP,
            vit_heads=EVA["heads"],
            qformer_heads=QF["heads"],
        )
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_minigpt4_needs_the_vit_and_pickle_consent(originals, tmp_path):
    with pytest.raises(ConversionError, match="give vit"):
        convert_minigpt4(
            originals / "pretrained_minigpt4_7b.pth",
            str(originals / "vicuna"),
            tmp_path / "o",
            blip2=originals / "blip2_pretrained_flant5xxl.pth",
            qformer_heads=QF["heads"],
        )
    torch.save({"model": {"llama_proj.weight": torch.zeros(2)}, "cfg": ConversionError("x")}, tmp_path / "p.pth")
    with pytest.raises(ConversionError, match="weights_only=True.*--trust-pickle"):
        convert_minigpt4(tmp_path / "p.pth", str(originals / "vicuna"), tmp_path / "o", vit=originals / "eva_vit_g.pth")


def test_minigpt4_blip2_file_with_its_own_vit_wins_over_vit_and_its_llm_is_ignored(originals, tmp_path, caplog):
    """A LAVIS BLIP-2 file may hold the ViT (39 blocks) and BLIP-2's own LLM next to the Q-Former.
    MiniGPT-4 loads eva_vit_g.pth, then the BLIP-2 file over it: the BLIP-2 file's ViT is used."""
    blip2 = blip2_tensors()
    vit_in_blip2 = {
        "visual_encoder." + n: t for n, t in eva_tensors(seed=11).items() if not n.startswith(f"blocks.{KEEP}.")
    }
    blip2.update(vit_in_blip2)
    blip2["t5_model.shared.weight"], blip2["opt_model.lm_head.weight"] = torch.zeros(30, 8), torch.zeros(30, 8)
    torch.save({"model": blip2}, tmp_path / BLIP2)
    with caplog.at_level(logging.INFO, logger="mmalign.model.convert"):
        out = convert_minigpt4(
            originals / PROJ,
            str(originals / "vicuna"),
            tmp_path / "m",
            blip2=tmp_path / BLIP2,
            vit=originals / VIT,
            vit_layers=KEEP,
            vit_heads=EVA["heads"],
            qformer_heads=QF["heads"],
        )
    model, _ = load_model(str(out))
    vision = model.vision_model.state_dict()
    assert torch.equal(vision["embeddings.class_embedding"], vit_in_blip2["visual_encoder.cls_token"])
    b = "visual_encoder.blocks.1.attn."
    assert torch.equal(vision["encoder.layers.1.self_attn.qkv.weight"], vit_in_blip2[b + "qkv.weight"])
    assert torch.equal(vision["encoder.layers.1.self_attn.qkv.bias"][-EVA["width"] :], vit_in_blip2[b + "v_bias"])
    log = "\n".join(r.getMessage() for r in caplog.records)
    n_vit = len(vit_in_blip2)
    assert re.search(rf"{n_vit} tensors are in both \S*{VIT} and \S*{BLIP2}: taken from the latter", log), log
    assert re.search(rf"converted tensors per file: 0 from \S*{VIT}, \d+ from \S*{BLIP2}, 2 from \S*{PROJ}", log)
    assert "BLIP-2's own language model" in log and "2 tensors" in log


def test_minigpt4_projection_checkpoint_wins_over_the_blip2_file(originals, tmp_path):
    """MiniGPT-4 loads its own checkpoint last (strict=False): a Q-Former tensor in it is used."""
    proj = torch.load(originals / PROJ)
    query = rnd(1, QF["queries"], QF["width"])
    proj["model"]["query_tokens"] = query
    torch.save(proj, tmp_path / PROJ)
    out = convert_minigpt4(
        tmp_path / PROJ,
        str(originals / "vicuna"),
        tmp_path / "m",
        blip2=originals / BLIP2,
        vit=originals / VIT,
        vit_layers=KEEP,
        vit_heads=EVA["heads"],
        qformer_heads=QF["heads"],
    )
    model, _ = load_model(str(out))
    assert torch.equal(model.query_tokens, query)


def test_rename_tables_are_two_way():
    """Every rule maps back: a missing target tensor is reported under its original name."""
    names = ["visual_encoder." + n for n in eva_tensors()] + list(blip2_tensors())
    names += ["llama_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    for arch in ("blip-2", "minigpt4_patch"):
        _, origin = rename(
            dict.fromkeys(names, torch.zeros(1)),
            MINIGPT4_RENAMES,
            MINIGPT4_IGNORED,
            ARCHITECTURES[arch].conversion_prefixes,
        )
        assert len(origin) > 50
        for target, orig in origin.items():
            assert original_name(target, MINIGPT4_RENAMES, ARCHITECTURES[arch].conversion_prefixes) == orig
    assert original_name("model.multi_modal_projector.linear_2.bias", LLAVA_RENAMES, {}) == "model.mm_projector.2.bias"


# --------------------------------------------------------------------------- LLaVA-1.5 / ShareGPT4V


def tiny_clip_vision(seed):
    torch.manual_seed(seed)
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        initializer_range=0.2,
    )


def write_llava_checkpoint(root, tok, *, model_type, arch, tower, seed, extra=None, tower_copy=False, cfg_edit=None):
    """An original LLaVA folder: config.json with mm_* fields, tokenizer, 2 .bin shards + index."""
    root.mkdir(parents=True)
    tok.save_pretrained(root)
    llm = tiny_llama(tok, seed)
    state = {k: v for k, v in llm.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)  # older transformers saved it
    torch.manual_seed(seed + 1)
    state.update(linear(LLM_WIDTH, 32, "model.mm_projector.0."))
    state.update(linear(LLM_WIDTH, LLM_WIDTH, "model.mm_projector.2."))
    if tower_copy:  # a self-trained checkpoint also holds the (frozen) tower; LLaVA ignores it
        for k, v in CLIPVisionModel(tiny_clip_vision(seed + 2)).state_dict().items():
            state[f"model.vision_tower.vision_tower.vision_model.{k}"] = v
    state.update(extra or {})
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in shards.items():
        torch.save({k: state[k].clone() for k in keys}, root / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (root / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    cfg = {
        **llm.config.to_dict(),
        "architectures": [arch],
        "model_type": model_type,
        "mm_vision_tower": tower,
        "mm_hidden_size": 32,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "rope_scaling": None,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
    }
    cfg.pop("dtype", None)
    cfg.pop("rope_parameters", None)
    if cfg_edit:
        cfg_edit(cfg)
    (root / "config.json").write_text(json.dumps(cfg))
    return state


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """openai/clip-vit-large-patch14-336 stand-in (full CLIPModel) and ShareGPT4V's tuned tower (CLIPVisionModel)."""
    root = tmp_path_factory.mktemp("clip")
    vcfg = tiny_clip_vision(11)
    tcfg = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPModel(CLIPConfig(vision_config=vcfg.to_dict(), text_config=tcfg)).save_pretrained(root / "clip-336")
    CLIPVisionModel(tiny_clip_vision(12)).save_pretrained(root / "sharegpt4v-vit-l12")
    return root


def llava_reference(state, tok, tower_dir, pixels, layer=-2):
    """LLaVA: CLIP hidden_states[layer] minus CLS -> mm_projector (Linear, GELU, Linear) -> spliced
    into LlavaLlamaForCausalLM, i.e. a Llama on the checkpoint's own model.* / lm_head tensors."""
    tower = CLIPVisionModel.from_pretrained(tower_dir).eval()
    with torch.no_grad():
        feats = tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
    feats = F.linear(feats, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])
    feats = F.linear(F.gelu(feats), state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
    llm = tiny_llama(tok, seed=0)
    llm_part = ("model.layers", "model.embed", "model.norm", "lm_head")
    llm.load_state_dict({k: v for k, v in state.items() if k.startswith(llm_part) and "inv_freq" not in k})
    return spliced_logits(llm, tok, "USER: ", feats, "\nWhat is it? ASSISTANT:")


def test_llava15_matches_reference_forward(tok, clip_dirs, tmp_path):
    state = write_llava_checkpoint(
        tmp_path / "llava-v1.5-7b",
        tok,
        model_type="llava",
        arch="LlavaLlamaForCausalLM",
        tower=str(clip_dirs / "clip-336"),
        seed=20,
    )
    out = convert_llava(str(tmp_path / "llava-v1.5-7b"), tmp_path / "out", max_shard_size="40KB")
    model, _ = load_model(str(out))
    assert type(model) is LlavaForConditionalGeneration
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert num_image_tokens(model.config) == 16 and template_of(out) == "vicuna_v1"
    assert image_transform_of(out) == "pad_to_square"  # image_aspect_ratio: pad, as LLaVA-1.5 serves it
    torch.manual_seed(21)
    pixels = torch.randn(1, 3, 32, 32)
    ref, ids_a, ids_b = llava_reference(state, tok, clip_dirs / "clip-336", pixels)
    torch.testing.assert_close(converted_logits(model, ids_a, ids_b, pixels)[..., : ref.shape[-1]], ref, **TOL)


def test_sharegpt4v_tower_override_and_ignored_tower_copy(tok, clip_dirs, tmp_path):
    """ShareGPT4V: its own model_type / class, mm_vision_tower = the tuned CLIP's hub id (given
    here as --vision, a local copy); the tower copy inside the checkpoint is not used."""
    state = write_llava_checkpoint(
        tmp_path / "ShareGPT4V-7B",
        tok,
        model_type="share4v",
        arch="Share4VLlamaForCausalLM",
        tower="Lin-Chen/ShareGPT4V-7B_Pretrained_vit-large336-l12",
        seed=30,
        tower_copy=True,
    )
    out = convert_llava(str(tmp_path / "ShareGPT4V-7B"), tmp_path / "out", vision=str(clip_dirs / "sharegpt4v-vit-l12"))
    model, _ = load_model(str(out))
    torch.manual_seed(31)
    pixels = torch.randn(1, 3, 32, 32)
    ref, ids_a, ids_b = llava_reference(state, tok, clip_dirs / "sharegpt4v-vit-l12", pixels)
    torch.testing.assert_close(converted_logits(model, ids_a, ids_b, pixels)[..., : ref.shape[-1]], ref, **TOL)
    assert json.loads((out / "mmalign.json").read_text())["converted_from"]["vision"].endswith("sharegpt4v-vit-l12")


LLAVA_BAD = {
    "missing": (dict(drop="model.mm_projector.2.bias"), r"missing tensor\(s\): model\.mm_projector\.2\.bias"),
    "extra": (dict(extra={"model.image_newline": torch.zeros(LLM_WIDTH)}), r"no place for: model\.image_newline"),
    "unknown": (dict(extra={"vision_resampler.w": torch.zeros(2)}), r"unknown name.*vision_resampler\.w"),
    "wrong shape": (
        dict(extra={"model.mm_projector.0.weight": torch.zeros(LLM_WIDTH, 31)}),
        r"model\.mm_projector\.0\.weight: \[48, 31\], the model needs \[48, 32\]",
    ),
    "linear projector": (dict(cfg_edit=lambda c: c.update(mm_projector_type="linear")), r"mm_projector_type 'linear'"),
    "unknown class": (dict(cfg_edit=lambda c: c.update(architectures=["LlavaMptForCausalLM"])), r"architectures"),
    "anyres": (dict(cfg_edit=lambda c: c.update(image_aspect_ratio="anyres")), r"image_aspect_ratio 'anyres'"),
}


@pytest.mark.parametrize("case", list(LLAVA_BAD))
def test_llava_bad_originals_name_the_problem(tok, clip_dirs, tmp_path, case):
    how, pattern = LLAVA_BAD[case]
    extra = dict(how.get("extra", {}))
    ckpt = tmp_path / "llava"
    write_llava_checkpoint(
        ckpt,
        tok,
        model_type="llava",
        arch="LlavaLlamaForCausalLM",
        tower=str(clip_dirs / "clip-336"),
        seed=40,
        extra=extra,
        cfg_edit=how.get("cfg_edit"),
    )
    if "drop" in how:  # rewrite the shard holding it
        index = json.loads((ckpt / "pytorch_model.bin.index.json").read_text())["weight_map"]
        shard = ckpt / index[how["drop"]]
        tensors = torch.load(shard)
        del tensors[how["drop"]]
        torch.save(tensors, shard)
        del index[how["drop"]]
        (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": index}))
    with pytest.raises(ConversionError, match=pattern):
        convert_llava(str(ckpt), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- plain transformers


PLAIN_HF = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    jobs = json.loads(sys.argv[1])  # name -> [converted folder, work folder]
    for name, (folder, work) in jobs.items():
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        with torch.no_grad():
            torch.save(model(**torch.load(f"{work}/inputs.pt")).logits, f"{work}/plain_logits.pt")
        print(name, type(model).__name__)
    proc = AutoProcessor.from_pretrained(jobs["llava"][0])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    print(repr(proc.apply_chat_template(msgs, add_generation_prompt=True)))
    assert not any(m == "mmalign" or m.startswith("mmalign.") for m in sys.modules), "mmalign was imported"
    """
)


def test_converted_folders_load_with_plain_transformers(tok, minigpt4_dir, clip_dirs, tmp_path):
    write_llava_checkpoint(
        tmp_path / "orig",
        tok,
        model_type="llava",
        arch="LlavaLlamaForCausalLM",
        tower=str(clip_dirs / "clip-336"),
        seed=50,
    )
    dirs = {"minigpt4": minigpt4_dir, "llava": convert_llava(str(tmp_path / "orig"), tmp_path / "llava")}
    jobs, expected = {}, {}
    for name, folder in dirs.items():
        model, _ = load_model(str(folder))
        n = num_image_tokens(model.config)
        ids = torch.tensor([[1, 5, 6, *([model.config.image_token_index] * n), 7, 8]])
        inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32)}
        work = tmp_path / f"work-{name}"
        work.mkdir()
        torch.save(inputs, work / "inputs.pt")
        jobs[name] = [str(folder), str(work)]
        with torch.no_grad():
            expected[name] = model(**inputs).logits
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_HF, json.dumps(jobs)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "minigpt4 Blip2ForConditionalGeneration" in run.stdout
    assert "llava LlavaForConditionalGeneration" in run.stdout
    assert "USER: <image>\\nWhat is it? ASSISTANT:" in run.stdout  # the chat template, as vicuna_v1
    for name, (_, work) in jobs.items():
        torch.testing.assert_close(torch.load(f"{work}/plain_logits.pt"), expected[name])


def test_cli_convert(originals, tok, clip_dirs, tmp_path, capsys):
    from mmalign.cli import main

    write_llava_checkpoint(
        tmp_path / "llava",
        tok,
        model_type="llava",
        arch="LlavaLlamaForCausalLM",
        tower=str(clip_dirs / "clip-336"),
        seed=60,
    )
    main(
        [
            "convert",
            "llava",
            "--checkpoint",
            str(tmp_path / "llava"),
            "--out",
            str(tmp_path / "out"),
            "--dtype",
            "bfloat16",
        ]
    )
    assert capsys.readouterr().out.strip().endswith("out")
    model, _ = load_model(str(tmp_path / "out"))
    assert type(model) is LlavaForConditionalGeneration and model.dtype == torch.bfloat16
    args = [
        "convert",
        "minigpt4",
        "--projection",
        str(originals / "pretrained_minigpt4_llama2_7b.pth"),
        "--llm",
        str(originals / "vicuna"),
        "--vit",
        str(originals / "eva_vit_g.pth"),
        "--out",
        str(tmp_path / "m"),
    ]
    with pytest.raises(SystemExit, match=r"mmalign convert minigpt4: error: .*--vit-heads"):
        main(args)  # a tiny EVA's head count cannot be guessed
    main([*args, "--vit-layers", "2", "--vit-heads", "2"])
    assert template_of(tmp_path / "m") == "llama2"


def test_a_mistyped_checkpoint_file_is_named_not_taken_for_a_hub_id(tmp_path):
    from mmalign.model.convert import ConversionError, convert_minigpt4

    (tmp_path / "proj.pth").write_bytes(b"")
    with pytest.raises(ConversionError, match="blip2_pretrained_flant5xxl.pth: no such file"):
        convert_minigpt4(
            tmp_path / "proj.pth", "some/llm", tmp_path / "out", blip2=tmp_path / "blip2_pretrained_flant5xxl.pth"
        )
