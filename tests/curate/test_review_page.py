"""The review page in a real headless browser (Debian's chromium + chromedriver, Selenium), as
the chat demo is tested: accept, reject and edit with the keyboard, each decision in SQLite at
once; a second tab sees them; a reload shows them; the status filter shows each kind."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from PIL import Image

from mmalign.curate.config import CurateConfig
from mmalign.curate.review import ReviewDB, progress, review_items
from mmalign.curate.review_page import ReviewState, launch_review
from mmalign.curate.store import StepLog

WAIT = 30
TEXTS = [f"The image shows {n} objects on a gray background. There is a red circle number {n}." for n in range(4)]


def make_workdir(tmp_path: Path) -> CurateConfig:
    cfg = CurateConfig(workdir=str(tmp_path / "work"))
    with StepLog(cfg.workdir, "describe") as d, StepLog(cfg.workdir, "fix") as f, StepLog(cfg.workdir, "filter") as r:
        for i, text in enumerate(TEXTS + ["dropped by a rule"]):
            image = tmp_path / f"img{i}.png"
            Image.new("RGB", (48, 48), (40 * i, 100, 200)).save(image)
            rec = {"image": str(image), "text": text}
            d.done(f"id{i}", **rec, prompt="Describe this image in detail.", answer=text, continuation="")
            f.done(f"id{i}", **rec, model="fixer")
            r.done(f"id{i}", **rec, kept=i < len(TEXTS), rule=None if i < len(TEXTS) else "too_short", matched={})
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    def __init__(self, driver, url: str | None = None):
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.wait = driver, WebDriverWait(driver, WAIT, poll_frequency=0.1)
        if url:
            driver.get(url)
        self.wait.until(lambda d: "Reviewed" in self.text("#progress") and self.shown_id())

    def text(self, css: str) -> str:
        found = self.d.find_elements("css selector", css)
        return found[0].text if found else ""

    def shown_id(self) -> str | None:
        m = re.search(r"id\d", self.text("#record"))
        return m[0] if m else None

    def box(self) -> str:
        return self.d.find_element("css selector", "#review-text textarea").get_attribute("value")

    def key(self, *keys) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.d).send_keys(*keys).perform()

    def chord(self, modifier, key) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.d).key_down(modifier).send_keys(key).key_up(modifier).perform()

    def after(self, action, shown: str) -> None:
        """Do ``action`` and wait until record ``shown`` is on the page."""
        action()
        self.wait.until(lambda d: self.shown_id() == shown and self.box() == TEXTS[int(shown[-1])])

    def show(self, status: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.d.find_element("css selector", "#show input")
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(status)
        self.wait.until(lambda d: d.find_elements("css selector", "ul[role=listbox] li"))
        box.send_keys(Keys.ENTER)


def test_keys_decide_at_once_and_every_tab_and_reload_sees_it(tmp_path, browser):
    from selenium.webdriver.common.keys import Keys

    cfg = make_workdir(tmp_path)
    db = ReviewDB(cfg.db_path)
    items = review_items(cfg)
    assert [it["id"] for it in items] == ["id0", "id1", "id2", "id3"]  # the record a rule dropped is not here
    port = free_port()
    page_app = launch_review(ReviewState(items, db, "tester"), port=port, block=False, refresh_s=0.5)
    url = f"http://127.0.0.1:{port}/"
    try:
        first = browser.current_window_handle
        browser.switch_to.new_window("tab")
        other = Page(browser, url)  # a second reviewer, open before any decision
        browser.switch_to.window(first)
        page = Page(browser, url)
        assert page.shown_id() == "id0" and page.box() == TEXTS[0]
        assert "Reviewed 0 / 4, left 4" in page.text("#progress")

        page.after(lambda: page.key("a"), "id1")
        assert db.decisions()["id0"]["decision"] == "accepted"  # committed the moment it was made
        page.after(lambda: page.key("r"), "id2")
        assert db.decisions()["id1"]["decision"] == "rejected"
        page.key("e")  # focus the text, rewrite it, Ctrl+Enter saves the edit
        page.chord(Keys.CONTROL, "a")
        page.key("There is one red circle.")
        page.after(lambda: page.chord(Keys.CONTROL, Keys.ENTER), "id3")
        assert db.decisions()["id2"] == {
            **db.decisions()["id2"],
            "decision": "edited",
            "text": "There is one red circle.",
        }
        assert "Reviewed 3 / 4, left 1" in page.text("#progress")

        browser.switch_to.window(other.d.window_handles[-1])  # the other tab, without a reload
        other.wait.until(lambda d: "Reviewed 3 / 4, left 1" in other.text("#progress"))
        other.show("edited")
        other.wait.until(lambda d: other.shown_id() == "id2" and other.box() == "There is one red circle.")
        other.show("rejected")
        other.wait.until(lambda d: other.shown_id() == "id1")

        browser.switch_to.window(first)
        browser.refresh()
        page = Page(browser)
        assert page.shown_id() == "id3" and "Reviewed 3 / 4, left 1" in page.text("#progress")
        page.after(lambda: page.key("j"), "id3")  # next: the only pending record is this one
        page.show("all")
        page.wait.until(lambda d: page.shown_id() == "id3")
        page.after(lambda: page.key(Keys.ARROW_RIGHT), "id0")
        assert "accepted by tester" in page.text("#record")
    finally:
        page_app.close()
    assert progress(items, db.decisions()) == {
        "total": 4,
        "reviewed": 3,
        "left": 1,
        "accepted": 1,
        "rejected": 1,
        "edited": 1,
    }
    assert [h[:2] for h in db.history()] == [("id0", "accepted"), ("id1", "rejected"), ("id2", "edited")]


def test_saving_an_unchanged_text_is_an_accept(tmp_path):
    cfg = make_workdir(tmp_path)
    db = ReviewDB(cfg.db_path)
    state = ReviewState(review_items(cfg), db)
    state.decide("id1", "edited", TEXTS[1] + "  ")
    assert db.decisions()["id1"]["decision"] == "accepted"
    assert state.pick("pending", "id1") == "id2"  # a decided record leaves the pending view
    assert state.pick("all", "id3", 1) == "id0"  # next wraps around


def test_accepting_a_changed_text_keeps_the_change(tmp_path):
    cfg = make_workdir(tmp_path)
    db = ReviewDB(cfg.db_path)
    state = ReviewState(review_items(cfg), db)
    state.decide("id2", "accepted", "A shorter text.")  # typed, then Accept instead of Ctrl+Enter
    assert (db.decisions()["id2"]["decision"], db.decisions()["id2"]["text"]) == ("edited", "A shorter text.")


def test_a_bad_decision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="decision must be one of"):
        ReviewDB(tmp_path / "r.sqlite").decide("x", "maybe", "text")
