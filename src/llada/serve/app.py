"""The OpenAI-compatible HTTP app: /v1/models, /v1/completions, /v1/chat/completions (with SSE
streaming), /health and /metrics.

Handlers validate a request, encode its prompt and hand one `Job` per prompt to the `Batcher`,
then wait for the job's updates: a streaming request forwards each newly final piece of text as
an SSE chunk, a plain request joins them. Every error is an OpenAI-style JSON body
`{"error": {"message", "type", "param", "code"}}`; a client that goes away cancels its jobs.

Requests must name an allowed host (the Host header; loopback names by default on a loopback
server) and POST bodies must be `application/json`, so that a web page in a browser cannot
drive a local server (DNS rebinding, cross-site form posts). No OpenAPI schema or docs pages
are served. How connections are timed and shut down is in server.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

try:
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the server needs FastAPI and uvicorn: pip install 'llada-kit[serve]'"
    ) from error

from ..api import default_decode
from ..inputs import context_of
from ..sampling.config import BlockDecodeConfig, DecodeConfig, GenerateConfig, profile
from ..tokenizer import encode_chat
from .batcher import Batcher, Job, QueueFull, ServerStopping, Update
from .config import ServeConfig, host_name
from .lockstep import Lockstep
from .metrics import Metrics
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    SamplerFields,
    Sampling,
    parse_body,
    resolve_sampling,
)

logger = logging.getLogger(__name__)

# Errors sent before the body has been read to its end close the connection: the rest of the
# body must not be taken as the next request, nor keep the connection open.
CLOSE = {"Connection": "close"}

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

# Where the metrics middleware leaves a request's arrival time (time.perf_counter()) in the
# request's state, for the time-to-first-chunk metric.
ARRIVED = "llada_arrived"

# Status of a request whose client went away before the answer (nginx's convention).
CLIENT_CLOSED = 499

# At shutdown, seconds to wait for the scheduler thread to leave a running sampler step.
STOP_WAIT_S = 2.0


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    # A message may quote the client's input: keep it encodable whatever that held.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if param is not None:
        param = param.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {
        "error": {"message": message, "type": _error_type(status), "param": param, "code": code}
    }
    return JSONResponse(body, status_code=status, headers=headers)


class _HostCheck:
    """ASGI middleware: refuse (400) a request whose Host header is not on the allow-list."""

    def __init__(self, app, allowed: frozenset[str] | None) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.allowed is None:
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
        name = host_name(raw.decode("latin-1")) if raw is not None else None
        if name in self.allowed:
            await self.app(scope, receive, send)
            return
        shown = "no Host header" if raw is None else f"the Host {raw.decode('latin-1')!r}"
        message = (
            f"{shown} is not allowed by this server (it takes {', '.join(sorted(self.allowed))});"
            " start it with --allowed-hosts to allow other names"
        )
        response = error_response(400, message, code="host_not_allowed", headers=CLOSE)
        await response(scope, receive, send)


class _RequestMetrics:
    """ASGI middleware: count every HTTP request by endpoint and status, and time it until its
    response (a stream included) has been sent."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in ENDPOINTS:
            endpoint = path
        elif path.startswith("/v1/models/"):
            endpoint = "/v1/models/{model}"
        else:
            endpoint = "other"
        status = [500]
        started = time.perf_counter()
        scope.setdefault("state", {})[ARRIVED] = started

        async def record_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.observe_request(endpoint, status[0], time.perf_counter() - started)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")


def _grace_ended() -> RequestError:
    """uvicorn cancels the requests still running when the shutdown grace ends (the only
    cancellation a handler sees): answer them with a 503 instead of uvicorn's plain 500."""
    return RequestError(
        503,
        "the server is shutting down and the grace period of requests in flight has ended; retry",
        code="unavailable",
        headers=CLOSE,
    )


class _ClientGone(Exception):
    """The client closed the connection before its request body was complete."""


async def _read_json(request: Request, max_bytes: int) -> object:
    """The request body as JSON, refusing another Content-Type (415), bodies over `max_bytes`
    (413) and bad JSON (400)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = f"{media_type!r}" if media_type else "none"
        raise RequestError(
            415,
            f"the request body must be JSON sent with 'Content-Type: application/json' "
            f"(got {shown})",
            code="unsupported_media_type",
            headers=CLOSE,
        )
    length = request.headers.get("content-length", "")
    too_large = RequestError(
        413, f"the request body is larger than {max_bytes} bytes", code="too_large", headers=CLOSE
    )
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
    except ClientDisconnect:
        raise _ClientGone() from None
    except asyncio.CancelledError:
        raise _grace_ended() from None
    if not body:
        raise RequestError(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(bytes(body), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise RequestError(400, f"the request body is not valid JSON: {error}") from None


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client has closed the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _State:
    """What the handlers share: the model, its tokenizer, the scheduler and the settings."""

    def __init__(
        self,
        model,
        tokenizer,
        config: ServeConfig,
        sampler: GenerateConfig,
        preset: str | DecodeConfig | BlockDecodeConfig,
        model_name: str,
        lockstep: Lockstep | None = None,
        default_max_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.sampler = sampler
        self.preset = preset
        self.block = bool(getattr(model, "block_diffusion", False))
        self.model_name = model_name
        self.created = int(time.time())
        self.metrics = Metrics()
        self.tokenizer_lock = threading.Lock()
        self.batcher = Batcher(
            model,
            tokenizer,
            self.metrics,
            max_queue=config.max_queue,
            max_batch_size=config.max_batch_size,
            batch_window_s=config.batch_window_ms / 1000,
            tokenizer_lock=self.tokenizer_lock,
            **({} if lockstep is None else {"denoise": lockstep.denoise}),
        )
        self.lockstep = lockstep
        self.default_max_tokens = default_max_tokens
        model_config = getattr(model, "config", None)
        self.vocab_size = getattr(model_config, "vocab_size", None)
        self.max_sequence_length, self.context_key = context_of(model)

    @property
    def health(self) -> tuple[bool, str]:
        """(healthy, status): 'ok', 'stopping', 'stalled' (the sampler made no progress for
        stall_timeout while requests wait or run) or 'down' (the scheduler thread died)."""
        batcher = self.batcher
        if batcher.stopping:
            return False, "stopping"
        if not batcher.thread_ok:
            return False, "down"
        if batcher.stalled_for() > self.config.stall_timeout:
            return False, "stalled"
        return True, "ok"

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise RequestError(
                404,
                f"the model {requested!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )

    def encode_text(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        with self.tokenizer_lock:
            return encode_chat(self.tokenizer, messages)

    def room(self, prompt_tokens: int) -> int | None:
        """Answer tokens the model's context leaves after a prompt (None: no context known).
        A LLaDA 2.x canvas may take up to a block more (its blocks count from the prompt's
        first token), which is kept free."""
        if self.max_sequence_length is None:
            return None
        margin = self.sampler.block_length if self.block else 0
        return self.max_sequence_length - prompt_tokens - margin

    def check_prompt(self, ids: list[int], sampling: Sampling, param: str) -> None:
        if not ids:
            raise RequestError(400, "the prompt is empty", param)
        if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in ids):
            raise RequestError(
                400, f"the prompt holds token ids outside [0, {self.vocab_size})", param
            )
        limit = self.config.max_prompt_tokens
        if len(ids) > limit:
            raise RequestError(
                400,
                f"the prompt has {len(ids)} tokens; this server takes at most {limit}",
                param,
                "context_length_exceeded",
            )
        total = len(ids) + sampling.config.gen_length
        if self.max_sequence_length is not None and total > self.max_sequence_length:
            raise RequestError(
                400,
                f"prompt ({len(ids)} tokens) + answer canvas ({sampling.config.gen_length}) "
                f"= {total} tokens, more than the model's context of {self.max_sequence_length} "
                f"({self.context_key} in its config.json); shorten the prompt or ask for fewer "
                "tokens",
                param,
                "context_length_exceeded",
            )

    def make_jobs(
        self,
        prompts: Sequence[list[int]],
        sampling: Sampling,
        request: SamplerFields,
        queue: asyncio.Queue,
    ) -> list[Job]:
        loop = asyncio.get_running_loop()
        stops = request.stop_strings()
        jobs = []
        for index, ids in enumerate(prompts):

            def sink(update: Update, index: int = index) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, update))

            jobs.append(
                Job(
                    prompt=list(ids),
                    config=sampling.config,
                    decode=sampling.decode,
                    sink=sink,
                    max_tokens=sampling.max_tokens,
                    stop=stops,
                    seed=request.seed,
                    mixed=self.config.mixed_batches,
                )
            )
        try:
            self.batcher.submit(jobs)
        except QueueFull:
            self.metrics.inc("llada_rejected_total", reason="queue_full")
            raise RequestError(
                429,
                "the server is busy (its queue is full); retry later",
                code="queue_full",
                headers={"Retry-After": str(self.config.retry_after)},
            ) from None
        except ServerStopping:
            self.metrics.inc("llada_rejected_total", reason="stopping")
            raise RequestError(503, "the server is shutting down", code="unavailable") from None
        return jobs


async def _next_update(queue: asyncio.Queue, watcher: asyncio.Future) -> tuple[int, Update] | None:
    """The next (choice index, update), or None if the client went away first."""
    get = asyncio.ensure_future(queue.get())
    try:
        done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get.done():  # the client left, or this task was cancelled
            get.cancel()
    return get.result() if get in done else None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


class _Reply:
    """Builds the response bodies of one request (chat or text completion)."""

    def __init__(self, chat: bool, model_name: str, choices: int, prompt_tokens: int) -> None:
        self.chat = chat
        self.model_name = model_name
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = choices
        self.prompt_tokens = prompt_tokens

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }

    def whole(self, texts: list[str], reasons: list[str | None], tokens: list[int]) -> dict:
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
                for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
            ]
            body = self._envelope("chat.completion", choices)
        else:
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
            ]
            body = self._envelope("text_completion", choices)
        body["usage"] = _usage(self.prompt_tokens, sum(tokens))
        return body

    def chunk(
        self, index: int, text: str | None, reason: str | None = None, role: bool = False
    ) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, tokens: list[int]) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = _usage(self.prompt_tokens, sum(tokens))
        return body


async def _respond(
    request: Request,
    state: _State,
    fields: SamplerFields,
    prompts: list[list[int]],
    sampling: Sampling,
    chat: bool,
) -> Response:
    queue: asyncio.Queue = asyncio.Queue()
    jobs = state.make_jobs(prompts, sampling, fields, queue)
    reply = _Reply(chat, state.model_name, len(jobs), sum(len(p) for p in prompts))
    ignored = fields.ignored_fields()
    notes = {"X-LLaDA-Ignored-Fields": ", ".join(ignored)} if ignored else {}
    if ignored:
        logger.info("request fields accepted without effect: %s", ", ".join(ignored))
    if fields.stream:
        stream = _stream(request, state, jobs, queue, reply, fields.include_usage)
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **notes},
        )
    texts = [""] * len(jobs)
    reasons: list[str | None] = [None] * len(jobs)
    tokens = [0] * len(jobs)
    open_jobs = set(range(len(jobs)))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        while open_jobs:
            try:
                item = await _next_update(queue, watcher)
            except asyncio.CancelledError:
                raise _grace_ended() from None
            if item is None:
                return Response(status_code=CLIENT_CLOSED)
            index, update = item
            if update.error is not None:
                if update.stopping:
                    raise RequestError(503, update.error, code="unavailable")
                raise RequestError(500, update.error, code="generation_failed")
            texts[index] += update.text
            tokens[index] = update.completion_tokens
            if update.finished:
                reasons[index] = update.finish_reason
                open_jobs.discard(index)
    finally:
        watcher.cancel()
        for index in open_jobs:
            state.batcher.cancel(jobs[index])
    return JSONResponse(reply.whole(texts, reasons, tokens), headers=notes)


async def _stream(
    request: Request,
    state: _State,
    jobs: list[Job],
    queue: asyncio.Queue,
    reply: _Reply,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE chunks: the role (chat), then each newly final piece of text, a chunk with the
    finish reason per choice, the usage if asked, and `data: [DONE]`."""
    tokens = [0] * len(jobs)
    open_jobs = set(range(len(jobs)))
    arrived = request.scope.get("state", {}).get(ARRIVED)  # None: no first chunk to time
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        if reply.chat:
            for index in range(len(jobs)):
                yield _sse(reply.chunk(index, "", role=True))
        while open_jobs:
            item = await _next_update(queue, watcher)
            if item is None:
                return  # the client went away; `finally` cancels its jobs
            index, update = item
            if update.error is not None:
                code = "unavailable" if update.stopping else "generation_failed"
                error = {"message": update.error, "type": "server_error", "param": None}
                yield _sse({"error": {**error, "code": code}})
                break
            tokens[index] = update.completion_tokens
            if arrived is not None and (update.text or update.finished):
                elapsed = time.perf_counter() - arrived
                state.metrics.observe("llada_time_to_first_chunk_seconds", elapsed)
                arrived = None
            if update.text:
                yield _sse(reply.chunk(index, update.text))
            if update.finished:
                open_jobs.discard(index)
                yield _sse(reply.chunk(index, None if reply.chat else "", update.finish_reason))
        if include_usage and not open_jobs:
            yield _sse(reply.usage_chunk(tokens))
        yield _sse("[DONE]")
    finally:
        watcher.cancel()
        for index in open_jobs:
            state.batcher.cancel(jobs[index])


def create_app(
    model,
    tokenizer,
    config: ServeConfig | None = None,
    sampler: GenerateConfig | None = None,
    preset: str | DecodeConfig | BlockDecodeConfig | None = None,
    model_name: str | None = None,
    lockstep: Lockstep | None = None,
    default_max_tokens: int | None = None,
) -> FastAPI:
    """The FastAPI app serving `model`.

    sampler: default sampler settings of a request (default: 64 tokens, blocks of 32, 64 steps);
    preset: the default decoding, a preset name or a config (None: the model family's,
    `llada.api.default_decode`: 'fast', or a LLaDA 2.x model's published setting);
    model_name: the id clients use (default: config.served_model_name, else the model
    folder's name). lockstep: rank 0's side of a tensor-parallel model (`Lockstep`): every
    sampler call is mirrored on the other ranks, which run `Lockstep.follow`.
    default_max_tokens: the answer budget of a request that names no max_tokens; None: what
    the model's context leaves after the prompt, up to config.max_gen_length.
    """
    if preset is None:
        preset = default_decode(model)
    config = config or ServeConfig()
    sampler = sampler or profile("serve").config()
    folder = getattr(model, "checkpoint_folder", None)
    name = model_name or config.served_model_name or (Path(folder).name if folder else "llada")
    state = _State(model, tokenizer, config, sampler, preset, name, lockstep, default_max_tokens)
    # the defaults must be valid
    resolve_sampling(SamplerFields(), sampler, preset, config, block_diffusion=state.block)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        try:
            yield
        finally:
            # Requests in flight have had the grace period already (server.py); a sampler
            # stuck in a step must not hold the exit.
            await run_in_threadpool(state.batcher.stop, STOP_WAIT_S)
            if state.lockstep is not None and state.batcher.stopped_cleanly:
                state.lockstep.stop()  # the other ranks leave their loop

    # No /docs, /redoc or /openapi.json: they would be open without the key.
    app = FastAPI(
        title="llada serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.llada = state
    app.add_middleware(_HostCheck, allowed=config.host_allow_list())
    app.add_middleware(_RequestMetrics, metrics=state.metrics)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code, error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else "request failed"
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(error.status_code, message, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, str(error))

    @app.exception_handler(_ClientGone)
    async def on_client_gone(request: Request, error: _ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def on_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed")
        return error_response(500, f"internal error: {type(error).__name__}", code="internal")

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            key.strip().encode(), config.api_key.encode()
        ):
            raise RequestError(
                401,
                "missing or wrong API key; send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy, status = state.health
        body = {
            "status": status,
            "model": state.model_name,
            "queue_depth": state.batcher.queue_depth,
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = state.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    def model_card() -> dict:
        return {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "llada",
        }

    @v1.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        state.check_model(model_id)
        return model_card()

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        fields = parse_body(CompletionRequest, await _read_json(request, config.max_body_bytes))
        fields.check_unsupported()
        state.check_model(fields.model)
        prompts = fields.prompts()
        if len(prompts) > config.max_batch_size:
            raise RequestError(
                400, f"at most {config.max_batch_size} prompts per request", "prompt"
            )
        encoded = [
            prompt
            if isinstance(prompt, list)
            else await run_in_threadpool(state.encode_text, prompt)
            for prompt in prompts
        ]
        sampling = resolve_sampling(
            fields,
            state.sampler,
            state.preset,
            config,
            block_diffusion=state.block,
            room=state.room(max(len(ids) for ids in encoded)),
            default_length=state.default_max_tokens,
        )
        for ids in encoded:
            state.check_prompt(ids, sampling, "prompt")
        return await _respond(request, state, fields, encoded, sampling, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _read_json(request, config.max_body_bytes)
        fields = parse_body(ChatCompletionRequest, body)
        fields.check_unsupported()
        state.check_model(fields.model)
        messages = fields.chat_messages()
        ids = await run_in_threadpool(state.encode_messages, messages)
        sampling = resolve_sampling(
            fields,
            state.sampler,
            state.preset,
            config,
            fields.max_completion_tokens,
            block_diffusion=state.block,
            room=state.room(len(ids)),
            default_length=state.default_max_tokens,
        )
        state.check_prompt(ids, sampling, "messages")
        return await _respond(request, state, fields, [ids], sampling, chat=True)

    app.include_router(v1)
    return app
