"""Calls to an OpenAI-compatible chat endpoint (ChatGPT, a vLLM server, ``mmalign serve``),
made safe to run over thousands of records.

- the official ``openai`` client, its own retries off: ours retry timeouts, lost connections,
  429 (after ``Retry-After`` when the server sends one) and 5xx with exponential backoff and
  full jitter, up to ``max_attempts`` per record; other 4xx fail the record at once;
- a request budget per run (retries count): once spent, no new request is sent and the records
  left stay pending;
- the raw HTTP body of every reply is kept (``Reply.raw``), and a reply without text (malformed
  JSON, no choices, empty content) is a ``MalformedReply``: the record stays pending, it is
  never passed through;
- after a record fails for want of a connection, the endpoint is marked unreachable so the step
  stops sending (its records stay pending for the next run) instead of waiting out every retry.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image

from mmalign.curate.config import EndpointConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_STATUS = {408, 409, 429}  # and every 5xx


class EndpointError(Exception):
    """A request that did not give a usable reply; ``kind`` says why, for the record."""

    def __init__(self, kind: str, message: str, raw: str | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind, self.raw = kind, raw


class MalformedReply(EndpointError):
    def __init__(self, message: str, raw: str | None):
        super().__init__("malformed reply", message, raw)


class BudgetSpent(EndpointError):
    def __init__(self) -> None:
        super().__init__("budget spent", "the run's request budget is spent")


@dataclass
class Reply:
    text: str
    raw: str  # the HTTP body as received
    completion_tokens: int | None
    finish_reason: str | None


class ChatEndpoint:
    """One endpoint: ``chat(messages) -> Reply`` with retries, a budget and a reachability flag."""

    def __init__(self, cfg: EndpointConfig, api_key: str | None = None) -> None:
        from openai import OpenAI

        self.cfg = cfg.resolved()
        if not self.cfg.model:
            raise ValueError("no endpoint model: set endpoint.model in the config, --model, or $OPENAI_MODEL")
        key = api_key or os.environ.get(self.cfg.api_key_env) or "none"  # local servers take any key
        self.client = OpenAI(base_url=self.cfg.base_url, api_key=key, timeout=self.cfg.timeout_s, max_retries=0)
        self.requests = 0  # sent this run, retries included
        self.unreachable = threading.Event()
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"{self.cfg.base_url or 'https://api.openai.com/v1'} ({self.cfg.model})"

    def _take(self) -> None:
        with self._lock:
            if self.cfg.budget is not None and self.requests >= self.cfg.budget:
                raise BudgetSpent()
            self.requests += 1

    def chat(self, messages: list[dict[str, Any]], max_tokens: int | None = None) -> Reply:
        """One completion, retried as the module doc says; raises ``EndpointError`` otherwise."""
        import openai

        for attempt in range(self.cfg.max_attempts):
            if self.unreachable.is_set():
                raise EndpointError("unreachable", f"{self.where} stopped answering earlier in this run")
            self._take()
            try:
                return self._once(messages, max_tokens)
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                status = getattr(e, "status_code", None)
                retry = status is None or status in RETRY_STATUS or status >= 500
                kind = _kind(e, status)
                if not retry or attempt == self.cfg.max_attempts - 1:
                    if status is None and not isinstance(e, openai.APITimeoutError):
                        self.unreachable.set()
                    raise EndpointError(kind, str(e)[:300], _body(e)) from None
                wait_s = _backoff(self.cfg, attempt, getattr(e, "response", None))
                log.debug("%s: %s, retry %d in %.2fs", self.where, kind, attempt + 1, wait_s)
                time.sleep(wait_s)
        raise EndpointError("no attempts", "endpoint.max_attempts is 0")

    def _once(self, messages: list[dict[str, Any]], max_tokens: int | None) -> Reply:
        import openai

        raw_response = self.client.chat.completions.with_raw_response.create(
            model=self.cfg.model,
            messages=messages,
            max_tokens=max_tokens or self.cfg.max_tokens,
            temperature=self.cfg.temperature,
        )
        raw = raw_response.http_response.text
        try:
            completion = raw_response.parse()
            choice = completion.choices[0]
            text = choice.message.content
        except (openai.APIResponseValidationError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise MalformedReply(f"cannot read a completion from the reply ({type(e).__name__})", raw) from None
        if not isinstance(text, str) or not text.strip():
            raise MalformedReply("the reply holds no text", raw)
        usage = getattr(completion, "usage", None)
        return Reply(text.strip(), raw, getattr(usage, "completion_tokens", None), choice.finish_reason)


def _kind(e: Exception, status: int | None) -> str:
    import openai

    if isinstance(e, openai.APITimeoutError):
        return "timeout"
    if status is None:
        return "connection error"
    return f"HTTP {status}"


def _body(e: Exception) -> str | None:
    response = getattr(e, "response", None)
    try:
        return response.text[:2000] if response is not None else None
    except Exception:  # noqa: BLE001 (a streamed or closed body: nothing to keep)
        return None


def _backoff(cfg: EndpointConfig, attempt: int, response: Any) -> float:
    """Full jitter on an exponential cap; a server's ``Retry-After`` (seconds) is a floor."""
    delay = random.uniform(0, min(cfg.max_backoff_s, cfg.backoff_s * 2**attempt))
    after = response.headers.get("retry-after") if response is not None else None
    try:
        return max(delay, min(float(after), cfg.max_backoff_s)) if after else delay
    except ValueError:
        return delay


def image_part(image: Image.Image) -> dict[str, Any]:
    """A PIL image as an OpenAI ``image_url`` part (a base64 PNG ``data:`` URL)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()},
    }


def run_concurrently(
    items: Iterable[T], work: Callable[[T], Any], concurrency: int, stop: threading.Event | None = None
) -> Iterator[tuple[T, Any, BaseException | None]]:
    """``work(item)`` for every item with at most ``concurrency`` in flight, yielding
    (item, result, error) as each finishes. Once ``stop`` is set no new item starts."""
    pending: dict[Future, T] = {}
    source = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        while True:
            while len(pending) < max(1, concurrency) and not (stop is not None and stop.is_set()):
                item = next(source, _END)
                if item is _END:
                    break
                pending[pool.submit(work, item)] = item
            if not pending:
                return
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                item = pending.pop(future)
                error = future.exception()
                yield item, None if error else future.result(), error


_END: Any = object()

__all__ = [
    "BudgetSpent",
    "ChatEndpoint",
    "EndpointError",
    "MalformedReply",
    "Reply",
    "image_part",
    "run_concurrently",
]
