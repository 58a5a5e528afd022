"""OpenAI-compatible chat server: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.

Requests are validated and their images decoded (`mmalign.chat.images`) in the web handlers;
a background worker thread takes the queued requests, joins those that arrive together (up to
`max_batch_size`, waiting at most `batch_wait_s` for more) into batches of equal sampling
settings and runs each batch as ONE left-padded `generate` call (`generate_rows`), every row
with its own token budget and stop strings and its text streamed to its own client. A batch
runs to its end before the next one starts (no continuous batching).

Every error is a 4xx/5xx JSON body in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmalign.chat.generate import Row, generate_rows
from mmalign.chat.images import ImageError, ImagePolicy, load_image_url
from mmalign.model.bundle import LoadedModel
from mmalign.prompts import build_generation_prompt, get_template, user_with_image

log = logging.getLogger(__name__)
_DEFAULT: Any = object()


# --------------------------------------------------------------------------- request schema (OpenAI's)


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (seed, user, ...)


class ImageURL(_Schema):
    url: str
    detail: str | None = None


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class ImagePart(_Schema):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Schema):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class ChatRequest(_Schema):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --------------------------------------------------------------------------- messages -> prompt


@dataclass
class Prompt:
    ids: list[int]
    images: list[Image.Image]


def build_prompt(
    req: ChatRequest, tokenizer: Any, template: Any, n_image_tokens: int, policy: ImagePolicy, system: Any
) -> Prompt:
    """OpenAI messages -> template prompt ids + images in prompt order. System / developer
    messages replace the template's system message; consecutive messages of one role are
    joined; a user message's images go in front of its text as the template's image markers."""
    t = get_template(template)
    sys_texts: list[str] = []
    turns: list[dict[str, str]] = []
    images: list[Image.Image] = []
    for i, m in enumerate(req.messages):
        parts = [m.content] if isinstance(m.content, str) else (m.content or [])
        texts = [p if isinstance(p, str) else p.text for p in parts if isinstance(p, (str, TextPart))]
        text = "\n".join(texts).strip()
        role = "system" if m.role in ("system", "developer") else m.role
        pics = [(j, p) for j, p in enumerate(parts) if isinstance(p, ImagePart)]
        if pics and role != "user":
            raise APIError(400, f"messages[{i}]: only user messages may hold images", f"messages[{i}].content")
        for j, p in pics:
            try:
                images.append(load_image_url(p.image_url.url, policy))
            except ImageError as e:
                raise APIError(
                    400, f"messages[{i}].content: {e}", f"messages[{i}].content[{j}].image_url", e.code
                ) from None
            text = user_with_image(t, text)
        if role == "system":
            sys_texts.append(text)
        elif turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + text
        else:
            turns.append({"role": role, "content": text})
    if not turns or turns[0]["role"] != "user" or turns[-1]["role"] != "user":
        raise APIError(400, "messages must start and end with a user message (after any system message)", "messages")
    sys_msg = "\n".join(sys_texts) if sys_texts else system
    kw = {} if sys_msg is _DEFAULT else {"system": sys_msg}
    try:
        ids = build_generation_prompt(tokenizer, t, turns, n_image_tokens, **kw)
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    return Prompt(ids, images)


# --------------------------------------------------------------------------- the batching worker


@dataclass
class Job:
    row: Row
    sampling: tuple[bool, float, float]  # (do_sample, temperature, top_p): one batch shares them
    emit: Callable[[tuple[str, Any]], None]  # ("text", str) ... then ("done", row) or ("error", exc)
    enqueued: float = field(default_factory=time.monotonic)


class BatchWorker:
    """One thread that owns the model: queued jobs -> batches -> `generate_rows`."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 16,
        batch_wait_s: float = 0.02,
        max_queue: int = 256,
        kv_cache: str = "dynamic",
    ):
        self.loaded, self.kv_cache = loaded, kv_cache
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.batches: collections.deque[int] = collections.deque(maxlen=1000)  # the last batches' sizes (for tests)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mmalign-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(
                429, "server busy: too many queued requests, retry later", None, "server_busy", "rate_limit_error"
            ) from None

    def _collect(self) -> list[Job]:
        try:
            jobs = [self.queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_wait_s
        while len(jobs) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
            try:
                jobs.append(self.queue.get(timeout=left))
            except queue.Empty:
                break
        return [j for j in jobs if not j.row.cancelled.is_set()]

    def _loop(self) -> None:
        while not self._stop.is_set():
            groups: dict[tuple, list[Job]] = {}
            for job in self._collect():
                groups.setdefault(job.sampling, []).append(job)
            for (do_sample, temperature, top_p), jobs in groups.items():
                self._run(jobs, do_sample=do_sample, temperature=temperature, top_p=top_p)

    def _run(self, jobs: list[Job], **gen: Any) -> None:
        self.batches.append(len(jobs))
        started = time.monotonic()
        try:
            generate_rows(self.loaded, [j.row for j in jobs], kv_cache=self.kv_cache, **gen)
        except Exception as e:  # noqa: BLE001 (reported to every client of the batch, the worker goes on)
            log.exception("generation failed for a batch of %d", len(jobs))
            for j in jobs:
                j.emit(("error", e))
            return
        tokens, seconds = sum(len(j.row.token_ids) for j in jobs), max(time.monotonic() - started, 1e-6)
        log.info("batch of %d: %d new tokens in %.2f s (%.0f tokens/s)", len(jobs), tokens, seconds, tokens / seconds)
        for j in jobs:
            j.emit(("done", j.row))


# --------------------------------------------------------------------------- the app


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; checked before any image is fetched or decoded."""

    default_max_tokens: int = 256
    max_context: int | None = None  # default: the LLM's max_position_embeddings (else 2048)
    max_images: int = 8


class Completions:
    """`/v1/chat/completions` behind the web layer: validate, build the prompt, queue the job,
    and shape what the worker produced as OpenAI's response."""

    def __init__(
        self,
        loaded: LoadedModel,
        worker: BatchWorker,
        *,
        model_name: str,
        system: Any,
        images: ImagePolicy,
        limits: Limits,
    ):
        self.loaded, self.worker, self.model_name, self.system, self.images = loaded, worker, model_name, system, images
        text_config = loaded.model.config.get_text_config()
        self.max_context = limits.max_context or getattr(text_config, "max_position_embeddings", None) or 2048
        self.limits = limits

    def check(self, req: ChatRequest) -> tuple[int, list[str]]:
        """Cheap checks first: a request that will be refused costs no image decoding."""
        if req.model not in (None, "", self.model_name):
            raise APIError(
                404,
                f"model {req.model!r} not found; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        max_new = req.max_completion_tokens or req.max_tokens or self.limits.default_max_tokens
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stops) or len(stops) > 4:
            raise APIError(400, "stop: up to 4 non-empty strings", "stop")
        n_images = sum(isinstance(p, ImagePart) for m in req.messages if isinstance(m.content, list) for p in m.content)
        if n_images and self.loaded.text_only:
            raise APIError(400, "this model is a text-only LLM: it takes no images", "messages", "images_not_supported")
        if n_images > self.limits.max_images:
            raise APIError(
                400,
                f"{n_images} images in one request, over the limit of {self.limits.max_images}",
                "messages",
                "too_many_images",
            )
        n_img = self.loaded.num_image_tokens
        if n_images * n_img + max_new > self.max_context:
            raise APIError(
                400,
                f"{n_images} images ({n_images * n_img} tokens) + max_tokens ({max_new}) are over "
                f"the model's context of {self.max_context} tokens",
                "messages",
                "context_length_exceeded",
            )
        return max_new, stops

    async def start(self, req: ChatRequest) -> tuple[Prompt, Row, asyncio.Queue]:
        """Queue the request's row; its text arrives as ("text", str) events, then done / error."""
        max_new, stops = self.check(req)
        n_img = self.loaded.num_image_tokens
        prompt = await run_in_threadpool(
            build_prompt, req, self.loaded.tokenizer, self.loaded.template, n_img, self.images, self.system
        )
        if len(prompt.ids) + max_new > self.max_context:
            raise APIError(
                400,
                f"prompt ({len(prompt.ids)} tokens) + max_tokens ({max_new}) is over the model's "
                f"context of {self.max_context} tokens",
                "messages",
                "context_length_exceeded",
            )
        pixels = await run_in_threadpool(lambda: [self.loaded.image_transform(im) for im in prompt.images])
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        row = Row(prompt.ids, pixels, max_new, tuple(stops), on_text=lambda s: emit(("text", s)))
        greedy = req.temperature == 0
        sampling = (not greedy, 1.0 if greedy else req.temperature, 1.0 if greedy else req.top_p)
        self.worker.submit(Job(row, sampling, emit))
        return prompt, row, events

    def meta(self) -> dict[str, Any]:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}

    @staticmethod
    def response(meta: dict[str, Any], prompt: Prompt, row: Row, text: str) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": row.finish_reason}
        usage = {
            "prompt_tokens": len(prompt.ids),
            "completion_tokens": len(row.token_ids),
            "total_tokens": len(prompt.ids) + len(row.token_ids),
        }
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}


def create_app(
    loaded: LoadedModel,
    *,
    model_name: str = "mmalign",
    system: Any = _DEFAULT,
    images: ImagePolicy = ImagePolicy(),  # noqa: B008 (a frozen dataclass: one shared default is safe)
    max_batch_size: int = 16,
    batch_wait_s: float = 0.02,
    max_queue: int = 256,
    limits: Limits = Limits(),  # noqa: B008 (frozen dataclass)
    kv_cache: str = "dynamic",
) -> FastAPI:
    """The FastAPI app around one loaded model (see the module doc)."""
    worker = BatchWorker(
        loaded, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s, max_queue=max_queue, kv_cache=kv_cache
    )
    completions = Completions(loaded, worker, model_name=model_name, system=system, images=images, limits=limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="mmalign", lifespan=lifespan)
    app.state.worker = worker
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "queued": worker.queue.qsize()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "mmalign"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        prompt, row, events = await completions.start(req)
        meta = completions.meta()
        if req.stream:
            return StreamingResponse(_sse(meta, events, row), media_type="text/event-stream")
        text = await _collect(events, row, request)
        if text is None:  # the client went away: nobody reads the answer
            return Response(status_code=499)
        return completions.response(meta, prompt, row, text)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error body with a 4xx / 5xx status."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            body = error_body(f"malformed JSON body: {err.get('msg')}", "invalid_request_error", None, "invalid_json")
            return JSONResponse(body, status_code=400)
        param = ".".join(loc) or None
        msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return JSONResponse(error_body(msg, "invalid_request_error", param, err.get("type")), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        body = error_body(str(e.detail), "invalid_request_error", None, str(e.status_code))
        return JSONResponse(body, status_code=e.status_code)


async def _collect(events: asyncio.Queue, row: Row, request: Request) -> str | None:
    """The whole answer of a non-streamed request, or None if its client disconnected first
    (its row then stops at the next step)."""
    text, gone = [], asyncio.ensure_future(_disconnect(request))
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                return None
            if (ev := getter.result())[0] != "text":
                break
            text.append(ev[1])
    finally:
        row.cancelled.set()  # ends the row's generation if it is still running
        gone.cancel()
    if ev[0] == "error":
        raise APIError(500, f"generation failed: {ev[1]}", None, "generation_failed", "server_error")
    return "".join(text)


async def _disconnect(request: Request) -> None:
    """Returns once the client has disconnected (checked every 0.2 s), so a non-streamed
    request also stops its row when its client goes away."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)


async def _sse(meta: dict[str, Any], events: asyncio.Queue, row: Row):
    """OpenAI's stream: a role chunk, content chunks, a finish chunk, then `data: [DONE]`."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body = {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (ev := await events.get())[0] == "text":
            yield chunk({"content": ev[1]})
        if ev[0] == "error":
            err = error_body(f"generation failed: {ev[1]}", "server_error", None, "generation_failed")
            yield f"data: {json.dumps(err)}\n\n"
        else:
            yield chunk({}, row.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        row.cancelled.set()  # the client went away (or the stream ended): stop generating its row


def serve(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    template: str | None = None,
    dtype: Any = None,
    device: str = "cpu",
    attn_implementation: str | None = None,
    load_in: str | None = None,
    model_name: str | None = None,
    allow_remote_images: bool = False,
    max_batch_size: int = 16,
    batch_wait_s: float = 0.02,
    kv_cache: str = "dynamic",
) -> None:
    """Load `model_dir` and serve it with uvicorn until interrupted."""
    import uvicorn

    loaded = LoadedModel.load(
        model_dir,
        template=template,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        load_in=load_in,
    )
    policy = ImagePolicy(allow_remote=allow_remote_images)
    app = create_app(
        loaded,
        model_name=model_name or model_dir,
        images=policy,
        max_batch_size=max_batch_size,
        batch_wait_s=batch_wait_s,
        kv_cache=kv_cache,
    )
    uvicorn.run(app, host=host, port=port)
