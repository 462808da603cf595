"""The FastAPI app: OpenAI-style chat completions over the batcher, model listing, health, the web page."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from mmcompose.model.mllm import MultimodalLLM
from mmcompose.serve.batcher import Batcher, Event, Job, Listener
from mmcompose.serve.guard import BrowserGuard, is_loopback
from mmcompose.serve.media import MediaLimits, build_example
from mmcompose.serve.schema import ChatRequest, ServeError, parse_request, stop_strings

STATIC = Path(__file__).with_name("static")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond these the server answers 4xx instead of working."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_tokens: int = 512
    request_seconds: float = 120.0
    max_waiting: int = 256
    media: MediaLimits = field(default_factory=MediaLimits)


@dataclass
class ServerConfig:
    """`host` is the address the server is bound to (a loopback one turns the Host check on);
    `allowed_origins` are the web origins besides the server's own whose pages may call it (`*`: any)."""

    model_id: str
    api_key: str | None = None
    max_batch: int = 8
    allowed_media_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"
    allowed_origins: frozenset[str] = frozenset()


def create_app(model: MultimodalLLM, config: ServerConfig) -> FastAPI:
    """An app serving `model` (folded for serving by the caller or here) with its own batcher thread."""
    model.eval()
    model.fold_text_route()
    batcher = Batcher(model, config.max_batch)
    modalities = list(model.branches)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.close()

    app = FastAPI(title="mmcompose", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    if config.allowed_origins:
        # any request header: an allowed page may use a client that adds its own (OpenAI's JS SDK: x-stainless-*)
        app.add_middleware(CORSMiddleware, allow_origins=sorted(config.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(BrowserGuard, origins=config.allowed_origins, check_host=is_loopback(config.host))  # outermost

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ServeError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        body = ServeError(500, f"internal error: {type(error).__name__}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise ServeError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                             kind="authentication_error", code="invalid_api_key")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_id, "auth": config.api_key is not None, **batcher.load()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": created,
                                            "owned_by": "mmcompose", "modalities": modalities}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        started = time.monotonic()
        chat = parse_request(await _json_body(request, config.limits.max_body_bytes))
        max_tokens = chat.max_completion_tokens or chat.max_tokens or min(256, config.limits.max_tokens)
        if max_tokens > config.limits.max_tokens:
            raise ServeError(400, f"max_tokens={max_tokens} exceeds this server's limit of "
                             f"{config.limits.max_tokens}", param="max_tokens")
        if batcher.load()["waiting"] >= config.limits.max_waiting:
            raise ServeError(429, f"{config.limits.max_waiting} requests are already waiting; retry later",
                             kind="rate_limit_error")
        example = await run_in_threadpool(build_example, model, chat, config.allowed_media_dir, config.limits.media)
        listener = Listener()
        job = Job(example=example, max_tokens=max_tokens, notify=listener, temperature=chat.temperature,
                  top_p=chat.top_p, seed=chat.seed, stop=stop_strings(chat))
        batcher.submit(job)
        deadline = started + config.limits.request_seconds
        completion = Completion(f"chatcmpl-{uuid.uuid4().hex}", config.model_id)
        try:
            first = await _next_event(listener, request, deadline)
        except BaseException:
            batcher.cancel(job)
            raise
        if first.kind == "error":
            raise _error_of(first)
        if chat.stream:
            return StreamingResponse(_stream(first, listener, request, deadline, job, batcher, completion, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text, event = "", first
            while event.kind == "delta":
                text += event.text
                event = await _next_event(listener, request, deadline)
        finally:
            batcher.cancel(job)
        if event.kind == "error":
            raise _error_of(event)
        return JSONResponse(completion.whole(text, event))

    return app


class Completion:
    """Builds the response objects of one completion (whole, or as stream chunks)."""

    def __init__(self, id: str, model: str) -> None:
        self.id, self.model, self.created = id, model, int(time.time())

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(event: Event) -> dict[str, int]:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def whole(self, text: str, event: Event) -> dict[str, Any]:
        return {**self._base("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": event.finish_reason}],
                "usage": self.usage(event)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, usage: dict | None = None) -> str:
        body = {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        if usage is not None:
            body = {**body, "choices": [], "usage": usage}
        return f"data: {json.dumps(body)}\n\n"


async def _stream(first: Event, listener: Listener, request: Request, deadline: float, job: Job, batcher: Batcher,
                  completion: Completion, chat: ChatRequest) -> AsyncIterator[str]:
    """SSE chunks: the role, each text delta, the finish reason (usage if asked), then `[DONE]`. However the
    stream ends (done, error, timeout, or the client gone, which cancels this generator), the job is cancelled
    so its batch row is freed."""
    try:
        yield completion.chunk({"role": "assistant", "content": ""})
        event = first
        while event.kind == "delta":
            yield completion.chunk({"content": event.text})
            event = await _next_event(listener, request, deadline)
        if event.kind == "error":
            yield f"data: {json.dumps(_error_of(event).body())}\n\n"
        else:
            yield completion.chunk({}, event.finish_reason)
            if chat.stream_options is not None and chat.stream_options.include_usage:
                yield completion.chunk({}, usage=Completion.usage(event))
        yield "data: [DONE]\n\n"
    except ServeError as error:
        yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        batcher.cancel(job)


def _error_of(event: Event) -> ServeError:
    return ServeError(event.status, event.text, kind="server_error" if event.status >= 500 else "invalid_request_error")


async def _next_event(listener: Listener, request: Request, deadline: float) -> Event:
    """The job's next event; a client gone or the deadline passed ends the wait (checked every 0.5 s)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServeError(408, "request took longer than this server's limit", code="timeout")
        try:
            return await listener.next(min(0.5, remaining))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ServeError(499, "client disconnected") from None


async def _json_body(request: Request, limit: int) -> Any:
    """The body as JSON, read no further than `limit` bytes.

    Parsed by pydantic's JSON parser (jiter), not `json.loads`: jiter refuses more than 200 levels of nesting
    and over-long integers with a `ValueError`, where `json.loads` raises `RecursionError` at Python's recursion
    limit (a body of `[[[[...` some thousand deep) and, for an integer of over 4300 digits, a `ValueError` that
    is not a `JSONDecodeError`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ServeError(413, f"request body exceeds the limit of {limit} bytes")
    try:
        return pydantic_core.from_json(body)
    except ValueError as error:
        raise ServeError(400, f"body is not valid JSON: {error}") from None
