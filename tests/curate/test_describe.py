"""The describe step: images keyed by content, Continue when short, corrupt images recorded
and retried, done records never redone; the endpoint backend sends image parts."""

from __future__ import annotations

import shutil

import pytest

from mmalign.curate.config import CurateConfig, DescribeConfig, EndpointConfig
from mmalign.curate.describe import EndpointDescriber, LocalDescriber, image_items, list_images
from mmalign.curate.endpoint import ChatEndpoint
from mmalign.curate.steps import run_describe
from mmalign.curate.store import read_step

from .conftest import toy_describer
from .fake_openai import FakeOpenAI


def test_images_are_listed_from_a_folder_a_list_or_a_glob(tmp_path, toy_images):
    assert len(list_images(toy_images)) == 13
    (tmp_path / "list.txt").write_text(f"{toy_images / '001.jpg'}\n\n{toy_images / '000.jpg'}\n")
    assert [p.name for p in list_images(tmp_path / "list.txt")] == ["000.jpg", "001.jpg"]
    assert len(list_images(f"{toy_images}/00*.jpg")) == 10
    with pytest.raises(ValueError, match="nothing found"):
        list_images(tmp_path / "absent")


def test_a_byte_identical_copy_is_one_item(tmp_path, toy_images):
    shutil.copy(toy_images / "000.jpg", tmp_path / "a.jpg")
    shutil.copy(toy_images / "000.jpg", tmp_path / "b.jpg")
    items = image_items(list_images(tmp_path))
    assert len(items) == 1 and len(items[0].id) == 64


def test_local_describe_continues_short_answers_and_resumes(tmp_path, toy_images):
    loaded = toy_describer()
    cfg = CurateConfig(workdir=str(tmp_path), images=str(toy_images))
    cfg.describe = DescribeConfig(min_tokens=12, max_new_tokens=10, batch_size=5)
    first = run_describe(cfg, LocalDescriber(loaded, cfg.describe), rank=0, world=1)
    assert (first.done, first.failed, first.reasons["corrupt image"]) == (12, 1, 1)
    state = read_step(tmp_path, "describe")
    done = [r for r in state.values() if r["status"] == "done"]
    assert all(r["continued"] == (r["tokens"] < 12) for r in done) and any(r["continued"] for r in done)
    for r in done:
        assert r["text"] == " ".join(p for p in (r["answer"], r["continuation"]) if p)
        assert r["prompt"] == cfg.describe.prompt and r["model"] == "toy-random"
    (bad,) = [r for r in state.values() if r["status"] == "failed"]
    assert bad["image"].endswith("999_corrupt.jpg") and "corrupt image" in bad["error"]

    again = run_describe(cfg, LocalDescriber(loaded, cfg.describe), rank=0, world=1)
    assert (again.already, again.done, again.failed) == (12, 0, 1)  # the corrupt one is tried again
    assert read_step(tmp_path, "describe")[bad["id"]]["attempts"] == 2


def test_the_endpoint_backend_sends_the_image_and_asks_to_continue(tmp_path, toy_images):
    server = FakeOpenAI()
    try:
        cfg = DescribeConfig(backend="openai", min_tokens=100)
        endpoint = ChatEndpoint(EndpointConfig(base_url=server.url, model="captioner", backoff_s=0.01))
        desc, raw = EndpointDescriber(endpoint, cfg).describe_one(image_items(list_images(toy_images))[0].open())
    finally:
        server.stop()
    assert desc.answer == f"FIXED {cfg.prompt}" and desc.continued and desc.continuation == "FIXED Continue"
    assert set(raw) == {"answer", "continuation"} and server.requests == 2
    first, second = server.bodies
    assert first["model"] == "captioner" and first["messages"][0]["content"][1]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == desc.answer and second["messages"][2]["content"] == "Continue"
