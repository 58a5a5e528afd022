"""`mmalign chat`: a multi-turn conversation in the terminal, or a scripted one (`--ask`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from PIL import Image

from mmalign.chat.session import ChatSession
from mmalign.model.bundle import LoadedModel

HELP = "Commands: /image PATH (new conversation about it), /reset, /quit"


def chat_in_terminal(
    loaded: LoadedModel, *, image: str | None = None, script: Sequence[str] | None = None, gen: dict[str, Any]
) -> None:
    """Answers streamed to stdout. With ``script``: one answer per line of it, then return;
    otherwise read messages (and /commands) from stdin until /quit or end of input."""
    session = ChatSession(loaded)
    if image:
        session.set_image(Image.open(image))
    if script:
        for text in script:
            print(f"User: {text}")
            _answer(session, text, gen)
        return
    print(HELP)
    lines = sys.stdin if not sys.stdin.isatty() else iter(lambda: input("User: "), None)
    for line in lines:
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if text:
            _command(session, text, gen)


def _command(session: ChatSession, text: str, gen: dict[str, Any]) -> None:
    if text == "/reset":
        session.reset()
    elif text.startswith("/image "):
        path = text.split(" ", 1)[1].strip()
        try:
            session.set_image(Image.open(path))
        except OSError as e:
            print(f"cannot open image {path}: {e}")
    else:
        try:
            _answer(session, text, gen)
        except ValueError as e:
            print(f"error: {e}")


def _answer(session: ChatSession, text: str, gen: dict[str, Any]) -> None:
    print("Assistant: ", end="", flush=True)
    for piece in session.ask(text, **gen):
        print(piece, end="", flush=True)
    print(flush=True)
