"""The web demo in a real headless browser (Debian's chromium + chromedriver, driven by Selenium).

The page runs on `toy-minigpt4` built from the shipped backbones (untrained projection: its
greedy answers are still deterministic), so every answer read from the page is compared with
`ChatSession`'s answer to the same image and question computed directly.
"""

from __future__ import annotations

import re
import socket
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from PIL import Image
from selenium.common.exceptions import TimeoutException

from mmalign.chat import demo as demo_mod
from mmalign.chat.demo import DemoModel, _Answers, _Handlers, launch, load_demo_model, toy_examples
from mmalign.chat.session import ChatSession
from mmalign.cli import main
from mmalign.model import LoadedModel, build_model
from mmalign.recipes import get_recipe

GREEDY = {"do_sample": False, "num_beams": 1, "max_new_tokens": demo_mod.MAX_NEW_TOKENS}
WAIT = 30  # seconds, for any one thing to appear on the page


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> DemoModel:
    recipe = get_recipe("toy-minigpt4")
    torch.manual_seed(0)
    model, tok = build_model(recipe.spec)
    examples = toy_examples(tmp_path_factory.mktemp("examples"))
    return DemoModel(LoadedModel.of(model, tok, recipe.template, name=recipe.name), "untrained", examples)


def direct_answer(dm: DemoModel, image: str | None, *questions: str) -> str:
    """The last answer of a fresh ChatSession asked `questions` in turn about `image`."""
    s = ChatSession(dm.loaded)
    if image:
        s.set_image(Image.open(image))
    for q in questions:
        answer = "".join(s.ask(q, **GREEDY))
    return answer.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(toy):
    port = free_port()
    demo = launch(toy, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


class Page:
    """The demo page in one browser tab (one Gradio session)."""

    # records every text the latest bot message shows, to see that the answer streams in
    OBSERVE = """
        window.__seen = [];
        new MutationObserver(() => {
            const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
            if (bots.length) window.__seen.push(bots[bots.length - 1].innerText);
        }).observe(document.querySelector('#chatbot'), {childList: true, subtree: true, characterData: true});
    """

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.wait = driver, WebDriverWait(driver, WAIT, poll_frequency=0.1)
        driver.get(url)
        self.wait.until(lambda d: d.find_elements("css selector", "#question textarea"))
        driver.execute_script(self.OBSERVE)

    def messages(self) -> list[tuple[str, str]]:
        found = self.d.execute_script(  # in one go: the chat re-renders while an answer streams in
            "return [...document.querySelectorAll('#chatbot [data-testid=user], #chatbot [data-testid=bot]')]"
            ".map(m => [m.dataset.testid, m.innerText]);"
        )
        return [(role, text.strip()) for role, text in found]

    def upload(self, path: str) -> None:
        self.d.find_element("css selector", "#image input[type=file]").send_keys(path)
        self.wait.until(lambda d: d.find_elements("css selector", "#image img"))

    def greedy(self) -> None:
        box = self.d.find_element("css selector", "#sample input[type=checkbox]")
        if box.is_selected():
            box.click()
        self.wait.until(lambda d: not box.is_selected())

    def ask(self, question: str, expected: str) -> str:
        """Send `question` and wait for the answer to stop growing; it should read `expected`."""
        n = len(self.messages())
        self.d.execute_script("window.__seen = [];")
        box = self.d.find_element("css selector", "#question textarea")
        box.send_keys(question)
        self.d.find_element("css selector", "#send").click()
        self.wait.until(lambda d: len(self.messages()) >= n + 2)
        try:  # done when it shows the expected answer; otherwise time out and report what it showed
            self.wait.until(lambda d: words(self.messages()[-1][1]) == expected)
        except TimeoutException:
            pass
        return self.messages()[-1][1]


def words(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_page_streams_the_sessions_answers_and_clear_restarts(toy, url, browser, tmp_path):
    image = toy.examples[0]
    q1 = q2 = "Describe this image in detail."
    want1 = direct_answer(toy, image, q1)
    want2 = direct_answer(toy, image, q1, q2)  # the second turn sees the first
    want_text_only = direct_answer(toy, None, q2)
    # distinct answers, so the page shows which image and history its session had
    assert len({want1, want2, want_text_only}) == 3, (want1, want2, want_text_only)

    page = Page(browser, url)
    page.upload(image)
    page.greedy()
    got1 = page.ask(q1, words(want1))
    assert words(got1) == words(want1)
    assert page.messages()[:2] == [("user", q1), ("bot", got1)]
    seen = [s.strip() for s in browser.execute_script("return window.__seen;")]
    partial = {s for s in seen if s and s != got1.strip() and got1.strip().startswith(s)}
    assert partial, f"the answer did not stream in: the page only ever showed {sorted(set(seen))[:5]}"

    got2 = page.ask(q2, words(want2))
    assert words(got2) == words(want2)
    assert len(page.messages()) == 4

    # a second tab is a second user: a conversation of its own, no image, no history
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    other = Page(browser, url)
    other.greedy()
    assert words(other.ask(q2, words(want_text_only))) == words(want_text_only)
    browser.close()
    browser.switch_to.window(first)
    assert len(page.messages()) == 4

    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000

    # the chat's own bin starts a new conversation about the same image
    browser.find_element("css selector", "#chatbot button[aria-label=Clear]").click()
    page.wait.until(lambda d: page.messages() == [])
    assert words(page.ask(q1, words(want1))) == words(want1)

    browser.find_element("css selector", "#clear").click()
    page.wait.until(lambda d: page.messages() == [])
    page.wait.until(lambda d: not d.find_elements("css selector", "#image img"))
    # the session restarted too: the next question is answered with no image and no history
    assert words(page.ask(q2, words(want_text_only))) == words(want_text_only)


def test_toy_default_without_a_trained_model_warns_and_builds_the_recipe(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(demo_mod, "TOY_EXPORT", tmp_path / "absent")
    with caplog.at_level("WARNING"):
        dm = load_demo_model(None, example_dir=tmp_path / "examples")
    assert dm.loaded.name == "toy-minigpt4" and dm.loaded.template == "minigpt4_v0"
    assert "UNTRAINED" in dm.note and "UNTRAINED" in caplog.text
    assert len(dm.examples) == 4 and all(Image.open(p).size == (48, 48) for p in dm.examples)


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_demo_model("unused", dtype="float33")


def test_demo_command_passes_its_options(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(demo_mod, "load_demo_model", lambda path, **kw: calls.update(path=path, **kw) or "dm")
    monkeypatch.setattr(demo_mod, "launch", lambda dm, **kw: calls.update(dm=dm, **kw))
    main(["demo", "--model", str(tmp_path), "--port", "7999", "--host", "0.0.0.0"])
    assert calls == {
        "path": str(tmp_path),
        "template": None,
        "dtype": "float32",
        "device": "cpu",
        "dm": "dm",
        "host": "0.0.0.0",
        "port": 7999,
        "share": False,
    }
    main(["demo", "--share"])
    assert calls["path"] is None and calls["share"] is True


def visitor(name: str | None) -> SimpleNamespace:  # what the handlers read of a gr.Request
    return SimpleNamespace(session_hash=name)


def ask(on: _Handlers, text: str, image: str | None, who: SimpleNamespace) -> list[dict]:
    """The chat the page shows after the answer to `text`, greedy."""
    *_, (_, history) = on.on_ask(text, image, 1, 1.0, False, who)
    return history


def test_a_question_sent_before_the_images_event_is_answered_about_the_image(toy):
    """Upload then Send at once: the question's event can reach the server before the image's.
    The answer is still about the page's image, and the late image event keeps the chat."""
    image, q = toy.examples[0], "Describe this image in detail."
    on, me, other = _Handlers(toy, demo_mod.MAX_NEW_TOKENS), visitor("me"), visitor("other")
    history = ask(on, q, image, me)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[-1]["content"].strip() == direct_answer(toy, image, q)
    assert on.on_image(image, me) == gr.skip() and on.visitor(me).chat.turns  # the chat stays
    assert on.on_image(image, other) == []  # another browser's first upload: its own new conversation
    assert on.visitor(other).chat.image is not None and not on.visitor(other).chat.turns
    on.on_leave(other)
    assert set(on.visitors) == {"me"}


def test_the_page_shows_the_conversation_the_model_has(toy):
    """A new image's event first, then a question the page sent with the old chat still on it:
    the answer starts a chat of its own, as the model's conversation does."""
    first, second, q = toy.examples[0], toy.examples[1], "Describe this image in detail."
    on, me = _Handlers(toy, demo_mod.MAX_NEW_TOKENS), visitor("me")
    ask(on, q, first, me)
    assert on.on_image(second, me) == []
    history = ask(on, q, second, me)
    assert len(history) == 2 and history[-1]["content"].strip() == direct_answer(toy, second, q)
    assert len(ask(on, q, second, me)) == 4  # the next turn continues it


def test_clear_restarts_a_conversation_without_an_image_too(toy):
    q = "Describe this image in detail."
    on, me = _Handlers(toy, demo_mod.MAX_NEW_TOKENS), visitor("me")
    ask(on, q, None, me)
    assert on.on_clear(me) == (None, [], "")
    assert not on.visitor(me).chat.turns
    assert ask(on, q, None, me)[-1]["content"].strip() == direct_answer(toy, None, q)


def test_calls_outside_a_browser_session_are_not_kept_and_visitors_are_bounded(toy, monkeypatch):
    monkeypatch.setattr(demo_mod, "MAX_VISITORS", 2)
    on = _Handlers(toy, demo_mod.MAX_NEW_TOKENS)
    assert on.visitor(visitor(None)) is not on.visitor(visitor(None)) and not on.visitors
    for name in ("a", "b", "a", "c"):  # "b" is the least recently active when "c" arrives
        on.visitor(visitor(name))
    assert list(on.visitors) == ["a", "c"]


class FailingSession:
    def ask(self, text, **gen):
        yield "partial"
        raise ValueError("conversation is 2001 tokens, over max_context=2000")


def test_a_failed_answer_raises_and_frees_the_model():
    answers = _Answers()
    stream = answers.stream(FailingSession(), "hi", {})
    assert next(stream) == "partial"
    with pytest.raises(ValueError, match="max_context"):
        next(stream)
    assert answers.lock.acquire(timeout=5)
