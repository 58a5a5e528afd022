"""A text-only causal LM folder (the curation fixer) loads as a LoadedModel, answers through
`mmalign serve`'s app and the official openai client, and refuses images with a 400."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmalign.chat.generate import generate_batch
from mmalign.model import LoadedModel
from mmalign.model.bundle import is_text_only
from mmalign.prompts import get_template

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_server import Server, colour, data_url  # noqa: E402  (tests/chat: the server test's helpers)

from mmalign.chat.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory, make_tiny_tokenizer):
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("fixer")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "mmalign.json").write_text(json.dumps({"template": "minigpt4_v0"}))
    return folder


def test_a_causal_lm_folder_loads_text_only(text_folder, tmp_path):
    assert is_text_only(text_folder)
    loaded = LoadedModel.load(text_folder)
    assert loaded.text_only and loaded.num_image_tokens == 0 and loaded.template == "minigpt4_v0"
    assert LoadedModel.load(text_folder, attn_implementation="eager").model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="text-only"):
        loaded.pixel_values([colour((1, 2, 3))])
    turns = [{"role": "user", "content": "Fix the error in the given paragraph."}]
    (answer,) = generate_batch(loaded, [(None, turns)], system=None, max_new_tokens=5)
    assert isinstance(answer, str)
    (tmp_path / "config.json").write_text((text_folder / "config.json").read_text())
    with pytest.raises(ValueError, match="chat template"):  # no mmalign.json, no --template
        LoadedModel._load_text_only(tmp_path, None, None, "cpu")


def test_served_text_model_answers_and_refuses_images(text_folder):
    loaded = LoadedModel.load(text_folder)
    server = Server(create_app(loaded, model_name="fixer"))
    try:
        reply = server.client.chat.completions.create(
            model="fixer", messages=[{"role": "user", "content": "a red circle."}], max_tokens=6, temperature=0
        )
        turns = [{"role": "user", "content": "a red circle."}]  # the server's default: the template's system message
        direct = generate_batch(loaded, [(None, turns)], system=get_template("minigpt4_v0").system, max_new_tokens=6)
        assert reply.choices[0].message.content == direct[0]
        image = {"type": "image_url", "image_url": {"url": data_url(colour((200, 0, 0)))}}
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]}
        status, error = server.post("/v1/chat/completions", body)
        assert status == 400 and error["error"]["code"] == "images_not_supported"
    finally:
        server.close()
