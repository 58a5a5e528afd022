"""The OpenAI-compatible server, through the official `openai` client and raw HTTP, against a
real uvicorn server on 127.0.0.1 (a free port), serving the toy model with an untrained
projector (answers depend on the question and image, which is all these tests need)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from mmalign.chat.images import ImagePolicy  # noqa: E402
from mmalign.chat.server import create_app  # noqa: E402
from mmalign.chat.session import ChatSession  # noqa: E402
from mmalign.model import (  # noqa: E402
    LoadedModel,  # noqa: E402
    build_model,
)
from mmalign.recipes import get_recipe  # noqa: E402

TEMPLATE = "minigpt4_v0"
MAX_PIXELS = 512 * 512


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def colour(rgb) -> Image.Image:
    return Image.new("RGB", (64, 64), rgb)


def user(text: str, image: Image.Image | None = None) -> dict:
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"role": "user", "content": parts}


class Server:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", timeout=60, max_retries=0)

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> tuple[int, dict]:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, json.loads(r.read())

    def close(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return build_model(get_recipe("toy-minigpt4").spec)


@pytest.fixture(scope="module")
def server(toy):
    model, tok = toy
    app = create_app(
        LoadedModel.of(model, tok, TEMPLATE),
        model_name="toy",
        max_batch_size=16,
        batch_wait_s=0.1,
        images=ImagePolicy(max_pixels=MAX_PIXELS),
    )
    s = Server(app)
    yield s
    s.close()


def ask(server, messages, **kw):
    kw = {"temperature": 0, "max_tokens": 16, **kw}
    return server.client.chat.completions.create(model="toy", messages=messages, **kw)


def ask_stream(server, messages, **kw) -> tuple[str, list]:
    kw = {"temperature": 0, "max_tokens": 16, **kw}
    chunks = list(server.client.chat.completions.create(model="toy", messages=messages, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list()] == ["toy"]
    status, body = server.get("/health")
    assert status == 200 and body["status"] == "ok"


def test_answer_is_the_chat_engines_greedy_answer(server, toy):
    model, tok = toy
    out = ask(server, [user("What is this?", colour((200, 20, 20)))], max_tokens=12)
    (choice,) = out.choices
    session = ChatSession(LoadedModel.of(model, tok, TEMPLATE))
    session.set_image(colour((200, 20, 20)))
    want = "".join(session.ask("What is this?", max_new_tokens=12)).strip()
    assert choice.message.content.strip() == want and want
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 9 and 0 < out.usage.completion_tokens <= 12


def test_stream_is_openai_chunks_joining_to_the_same_text(server):
    messages = [user("Describe this image in detail.", colour((20, 20, 200)))]
    text, chunks = ask_stream(server, messages)
    assert text == ask(server, messages).choices[0].message.content and text
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # streamed in pieces


def test_max_tokens_and_stop(server):
    messages = [user("Describe this image in detail.", colour((20, 180, 20)))]
    short = ask(server, messages, max_tokens=3).choices[0]
    assert short.finish_reason == "length"
    full = ask(server, messages, max_tokens=16).choices[0].message.content
    word = full.split()[2]
    cut = ask(server, messages, max_tokens=16, stop=[word]).choices[0]
    assert cut.message.content == full[: full.index(word)] and cut.finish_reason == "stop"


def test_multi_turn_with_system_message_and_two_images(server):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        user("What is this?", colour((200, 20, 20))),
        {"role": "assistant", "content": "A red square."},
        user("And this one?", colour((20, 20, 200))),
    ]
    out = ask(server, messages)
    assert out.choices[0].message.content and out.usage.prompt_tokens > 18


def test_sampling_settings_are_accepted(server):
    out = ask(server, [user("What is this?", colour((200, 20, 20)))], temperature=0.8, top_p=0.9, max_tokens=5)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_concurrent_streams_get_the_answers_they_get_alone(server):
    """16 streaming clients at once: batched together, each gets its one-at-a-time answer."""
    cases = [
        (q, colour((40 * i % 256, 90, 255 - 15 * i)))
        for i, q in enumerate(
            ["What is this?", "Describe this image in detail.", "How many shapes are there?", "What color is it?"] * 4
        )
    ]
    messages = [[user(q, im)] for q, im in cases]
    alone = [ask_stream(server, m)[0] for m in messages]
    before = len(server.app.state.worker.batches)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda m: ask_stream(server, m)[0], messages))
    assert together == alone
    assert len(set(alone)) > 2  # prompt-dependent answers were compared
    assert max(list(server.app.state.worker.batches)[before:]) > 1  # they really were batched


ERROR_CASES = [
    ("file URL", {"url": "file:///etc/passwd"}, "unsupported_image_url"),
    ("local path", {"url": "/etc/passwd"}, "unsupported_image_url"),
    ("remote URL", {"url": "http://127.0.0.1:9/cat.png"}, "remote_images_disabled"),
    ("bad base64", {"url": "data:image/png;base64,@@not base64@@"}, "invalid_base64"),
    ("not an image", {"url": "data:image/png;base64," + base64.b64encode(b"hello world").decode()}, "invalid_image"),
    ("too many pixels", {"url": data_url(Image.new("RGB", (1024, 1024)))}, "image_too_large"),
]


@pytest.mark.parametrize("name, image_url, code", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_images_get_a_400_in_openai_shape(server, name, image_url, code):
    msg = {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": image_url}]}
    status, body = server.post("/v1/chat/completions", {"model": "toy", "messages": [msg]})
    assert status == 400, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code
    assert body["error"]["param"] == "messages[0].content[1].image_url"
    assert ask(server, [user("What is this?")], max_tokens=2).choices  # still serving


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b'{"model": "toy", "messages": [', 400, None),  # malformed JSON
        ({"model": "toy", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({"model": "toy", "messages": []}, 400, "messages"),
        ({"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "toy", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "messages"),
    ],
    ids=["malformed-json", "unknown-role", "no-messages", "max-tokens-0", "no-user", "unknown-model", "too-long"],
)
def test_bad_requests_get_4xx_in_openai_shape(server, body, status, param):
    got, out = server.post("/v1/chat/completions", body)
    assert got == status, out
    assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["message"]
    assert out["error"]["param"] == param
    assert server.get("/health")[0] == 200


def test_cheap_checks_come_before_any_image_is_decoded(server, monkeypatch):
    """stop, the image count and the images' share of the context are checked first: a refused
    request never fetches or decodes an image (here: load_image_url would fail the test)."""
    import mmalign.chat.server as server_module

    def no_decoding(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(server_module, "load_image_url", no_decoding)
    pic = {"type": "image_url", "image_url": {"url": data_url(colour((1, 2, 3)))}}
    cases = [
        ({"stop": ["", "x"]}, [pic], "stop", None),
        ({}, [pic] * 9, "messages", "too_many_images"),
        ({"max_tokens": 500}, [pic] * 8, "messages", "context_length_exceeded"),
    ]
    for extra, pics, param, code in cases:
        msg = {"role": "user", "content": [{"type": "text", "text": "hi"}, *pics]}
        status, body = server.post("/v1/chat/completions", {"model": "toy", "messages": [msg], **extra})
        assert status == 400 and body["error"]["param"] == param, body
        assert code is None or body["error"]["code"] == code, body
        if code == "context_length_exceeded":
            assert "8 images" in body["error"]["message"], body  # refused on the image count, before decoding


def test_a_non_streaming_client_that_goes_away_stops_its_row(server, toy, monkeypatch):
    """Without polling for the disconnect, the row would run all its 200 tokens (>= 6 s here)."""
    model, tok = toy
    worker = server.app.state.worker
    jobs, submit = [], worker.submit
    monkeypatch.setattr(worker, "submit", lambda job: (jobs.append(job), submit(job))[1])
    token = tok.encode(" a", add_special_tokens=False)[-1]

    def slow_and_endless(module, args, out):  # every step 30 ms, never a stop token
        time.sleep(0.03)
        forced = torch.full_like(out, -1e4)
        forced[..., token] = 0
        return forced

    hook = model.get_output_embeddings().register_forward_hook(slow_and_endless)
    try:
        body = json.dumps(
            {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 0}
        ).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            conn.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            deadline = time.monotonic() + 30
            while not (jobs and len(jobs[0].row.token_ids) >= 3):
                assert time.monotonic() < deadline, "generation did not start"
                time.sleep(0.02)
        deadline = time.monotonic() + 30
        while jobs[0].row.finish_reason is None:
            assert time.monotonic() < deadline, "the row did not end"
            time.sleep(0.02)
    finally:
        hook.remove()
    assert jobs[0].row.finish_reason == "cancelled", (len(jobs[0].row.token_ids), jobs[0].row.text[:80])
    assert len(jobs[0].row.token_ids) < 100
    assert ask(server, [user("What is this?")], max_tokens=2).choices  # still serving


def test_openai_client_sees_the_error(server):
    with pytest.raises(openai.BadRequestError, match="remote image URLs are refused"):
        server.client.chat.completions.create(
            model="toy",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
                }
            ],
        )
