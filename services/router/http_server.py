"""The OpenAI-compatible HTTP front end (FastAPI on uvicorn), the HTTP twin of grpc_server.

    POST /v1/completions, /v1/chat/completions   JSON, or SSE when "stream": true
    POST /tokenize, /detokenize                  vLLM's shapes
    GET  /v1/models, /v1/models/{id}, /health, /metrics, /version

The server answers to each of its served model names (--served-model-name NAME [ALIAS...]); a response names the
model the request named, or the first name.

Status codes: 400 bad parameters (pydantic errors included), 404 unknown model or path, 413 body over
router.config.max_request_bytes, 429 ResourceExhausted, 503 while starting or draining and on Unavailable,
504 on a deadline; every error body is OpenAI's `{"error": {"message", "type", "param", "code"}}`.
The router's generate iterator is always closed when a client goes away (streaming or not), which aborts the
request and frees its KV on both sides. uvicorn runs as a task on the caller's event loop and leaves signal
handling to `pdserve serve`, which drains before it calls stop().
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Generator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from services.engine.errors import InvalidRequest, ResourceExhausted
from services.engine.tokenizer import Tokenizer
from services.router.errors import Unavailable
from services.router.metrics import Metrics
from services.router.openai_protocol import (
    ChatCompletionRequest,
    ChatFormat,
    CompletionFormat,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    LogprobOptions,
    ModelCard,
    ModelList,
    Outputs,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    TokenText,
    chat_prompt_ids,
    new_id,
    now,
)
from services.router.router import Chunk, Event, GenerateInput, Router

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A body over the limit is still read (and dropped) up to this size, so the client reads the 413 rather than
# a connection reset; anything larger gets the 413 at once.
DRAIN_LIMIT = 64 * 2**20
_T = TypeVar("_T")


class HttpError(Exception):
    """An error answered with `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


class _ClientGone(Exception):
    """The client disconnected before the response started."""


def error_response(e: HttpError) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code))
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(body.model_dump(), status_code=e.status, headers=headers)


def http_error_for(e: BaseException) -> HttpError:
    """The HTTP answer to an error raised by the router (the gRPC servicer's status_for, for HTTP)."""
    if isinstance(e, HttpError):
        return e
    if isinstance(e, InvalidRequest):
        return HttpError(400, str(e), code="invalid_parameter", param=getattr(e, "param", None))
    if isinstance(e, ResourceExhausted):
        return HttpError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded")
    if isinstance(e, Unavailable):
        return HttpError(503, str(e), type="server_error", code="service_unavailable")
    if isinstance(e, TimeoutError):
        return HttpError(504, str(e) or "the request timed out", type="server_error", code="timeout")
    log.error("unexpected error in the HTTP server", exc_info=e)
    return HttpError(500, f"internal error: {type(e).__name__}", type="server_error", code="internal_error")


def validation_error(e: ValidationError | RequestValidationError) -> HttpError:
    errors = e.errors()
    described = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in errors[:3]]
    fields = [str(p) for p in errors[0]["loc"] if p != "body"] if errors else []
    return HttpError(400, "; ".join(described) or "invalid request", code="invalid_parameter",
                     param=fields[0] if fields else None)


def _sse(item: BaseModel) -> bytes:
    return f"data: {item.model_dump_json()}\n\n".encode()


class _EventStream(StreamingResponse):
    """An SSE response that stops, and closes its body iterator (so the router request ends), when the client
    disconnects. StreamingResponse's own __call__ is replaced: its anyio cancel scope cancels again at every
    await in the router's cleanup, while one plain asyncio cancellation lets that cleanup run to the end."""

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _until_disconnect(receive, pump())
        except _ClientGone:
            pass
        finally:
            await _close(self.body_iterator)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own SIGINT/SIGTERM handlers: `pdserve serve` owns the signals and the drain."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    """Serves the API on host:port (0 picks a free port; the bound one is `port` after start())."""

    def __init__(self, router: Router, metrics: Metrics, tokenizer: Tokenizer, model_names: Sequence[str], host: str,
                 port: int) -> None:
        """`model_names`: the served names, the first the main one."""
        self.router = router
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.token_text = TokenText(tokenizer)
        self.model_names = [model_names] if isinstance(model_names, str) else list(model_names)
        if not self.model_names:
            raise ValueError("the HTTP server needs at least one served model name")
        self.host = host
        self.port = port
        self.ready = False
        self.draining = False
        self.created = now()
        self.version = _package_version()
        self.app = self._build_app()
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        config = uvicorn.Config(self.app, host=self.host, port=self.port, lifespan="off", log_config=None,
                                log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        sock = config.bind_socket()
        self.port = sock.getsockname()[1]
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("OpenAI HTTP API on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        self._server = self._task = None

    # ---- the app ----------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="pdserve", version=self.version, docs_url=None, redoc_url=None)

        async def on_error(request: Request, e: Exception) -> Response:
            if isinstance(e, StarletteHTTPException):
                return error_response(HttpError(e.status_code, str(e.detail), code=_code_for(e.status_code)))
            if isinstance(e, RequestValidationError):
                return error_response(validation_error(e))
            return error_response(http_error_for(e))

        for kind in (HttpError, InvalidRequest, ResourceExhausted, Unavailable, TimeoutError, RequestValidationError,
                     StarletteHTTPException, Exception):
            app.add_exception_handler(kind, on_error)

        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics_text, methods=["GET"])
        app.add_api_route("/version", self.version_info, methods=["GET"])
        return app

    async def completions(self, request: Request) -> Response:
        req = await self._parse(request, CompletionRequest)
        params = req.sampling_params(self.router.sampling_defaults)
        text, ids = req.prompt_ids(self.tokenizer, self.router.vocab_size)
        echo = (text if text is not None else self.tokenizer.decode(ids)) if req.echo else None
        options = LogprobOptions(logprobs=req.logprobs, prompt=params.prompt_logprobs, echo_text=echo, prompt_ids=ids)
        fmt = CompletionFormat(new_id(CompletionFormat.id_prefix), self._model_for(req.model), self.token_text,
                               params.n, options)
        inp = GenerateInput(request_id=fmt.id, token_ids=ids, params=params, priority=req.priority or 0)
        return await self._generate(request, inp, fmt, bool(req.stream), req.include_usage)

    async def chat_completions(self, request: Request) -> Response:
        req = await self._parse(request, ChatCompletionRequest)
        params = req.sampling_params(self.router.sampling_defaults)
        ids = chat_prompt_ids(self.tokenizer, req)
        options = LogprobOptions(logprobs=params.logprobs, prompt=params.prompt_logprobs)
        fmt = ChatFormat(new_id(ChatFormat.id_prefix), self._model_for(req.model), self.token_text, params.n,
                         options)
        inp = GenerateInput(request_id=fmt.id, token_ids=ids, params=params, priority=req.priority or 0)
        return await self._generate(request, inp, fmt, bool(req.stream), req.include_usage)

    async def tokenize(self, request: Request) -> TokenizeResponse:
        data = await self._parse_json(request)
        req: TokenizeChatRequest | TokenizeCompletionRequest
        if "messages" in data:
            req = self._validate(data, TokenizeChatRequest)
        else:
            req = self._validate(data, TokenizeCompletionRequest)
        ids = req.token_ids(self.tokenizer)
        return TokenizeResponse(count=len(ids), max_model_len=self.router.max_model_len, tokens=ids)

    async def detokenize(self, request: Request) -> DetokenizeResponse:
        req = await self._parse(request, DetokenizeRequest)
        return DetokenizeResponse(prompt=req.text(self.tokenizer))

    async def models(self) -> ModelList:
        return ModelList(data=[self._card(name) for name in self.model_names])

    async def model(self, model_id: str) -> ModelCard:
        self._check_model(model_id)
        return self._card(model_id)

    async def health(self) -> Response:
        self._check_serving()
        return JSONResponse({"status": "ok"})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def version_info(self) -> dict[str, str]:
        return {"version": self.version}

    # ---- request path ------------------------------------------------------------------------------------
    async def _parse(self, request: Request, model: type[_T]) -> _T:
        return self._validate(await self._parse_json(request), model)

    async def _parse_json(self, request: Request) -> dict[str, Any]:
        self._check_serving()
        body = await self._read_body(request)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HttpError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the request body must be a JSON object", code="invalid_json")
        return data

    def _validate(self, data: dict[str, Any], model: type[_T]) -> _T:
        try:
            req = model.model_validate(data)  # type: ignore[attr-defined]
        except ValidationError as e:
            raise validation_error(e) from None
        self._check_model(req.model)
        return req  # type: ignore[no-any-return]

    async def _read_body(self, request: Request) -> bytes:
        limit = self.router.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise HttpError(400, f"bad Content-Length header {declared!r}")
        too_large = HttpError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        if declared is not None and int(declared) > DRAIN_LIMIT:
            raise too_large
        body = bytearray()
        size = 0
        async for part in _body_parts(request):
            size += len(part)
            if size > DRAIN_LIMIT:
                raise too_large
            if size <= limit:
                body += part
        if size > limit:
            raise too_large
        return bytes(body)

    def _check_serving(self) -> None:
        if self.draining:
            raise HttpError(503, "the server is draining", type="server_error", code="service_unavailable")
        if not self.ready:
            raise HttpError(503, "the server is starting: workers are not ready yet", type="server_error",
                            code="service_unavailable")

    def _check_model(self, model: str | None) -> None:
        if model and model not in self.model_names:
            served = ", ".join(f"`{name}`" for name in self.model_names)
            raise HttpError(404, f"The model `{model}` does not exist; this server serves {served}.",
                            code="model_not_found", param="model")

    def _model_for(self, model: str | None) -> str:
        """The name a response gives: the one the request used, or the main one."""
        return model or self.model_names[0]

    def _card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.created, root=self.model_names[0],
                         max_model_len=self.router.max_model_len)

    async def _generate(self, request: Request, inp: GenerateInput, fmt: CompletionFormat, stream: bool,
                        include_usage: bool) -> Response:
        events = self.router.generate(inp)
        try:
            if not stream:
                outputs = await _until_disconnect(request.receive, _collect(events, fmt.n))
                return JSONResponse(fmt.response(outputs).model_dump())
            # The first event is awaited before the 200 goes out, so bad input and overload get their status.
            first = await _until_disconnect(request.receive, anext(events))
        except _ClientGone:
            await _close(events)
            return Response(status_code=499)
        except BaseException:
            await _close(events)
            raise
        return _EventStream(_stream(events, first, fmt, include_usage))


async def _body_parts(request: Request) -> AsyncIterator[bytes]:
    try:
        async for part in request.stream():
            yield part
    except ClientDisconnect:
        raise HttpError(400, "the client disconnected while sending the body", code="client_disconnected") from None


async def _collect(events: AsyncIterator[Event], n: int) -> Outputs:
    outputs = Outputs(n)
    async for event in events:
        outputs.add(event)
        if outputs.done:
            return outputs
    raise Unavailable("the request ended without a completion")


async def _stream(events: AsyncIterator[Event], first: Event, fmt: CompletionFormat,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """SSE lines: the chunks of the n outputs (told apart by the choice index), a chunk with each output's
    finish_reason, the usage chunk if asked, then [DONE].
    An error after the 200 went out is sent as an error object in the stream, as vLLM does."""
    try:
        for opening in fmt.opening():
            yield _sse(opening)
        outputs = Outputs(fmt.n)
        event: Event | None = first
        while event is not None:
            outputs.add(event)
            item: BaseModel | None = fmt.chunk(event) if isinstance(event, Chunk) else fmt.final(event)
            if item is not None:
                yield _sse(item)
            if outputs.done:
                break
            event = await anext(events, None)
        if not outputs.done:
            raise Unavailable("the request ended without a completion")
        if include_usage:
            yield _sse(fmt.usage_chunk(outputs.usage()))
    except Exception as e:  # noqa: BLE001 - every failure reaches the client as an error object
        err = http_error_for(e)
        yield _sse(ErrorResponse(error=ErrorInfo(message=err.message, type=err.type, code=err.code)))
    finally:
        await _close(events)
    yield b"data: [DONE]\n\n"


async def _until_disconnect(receive: Receive, work: Awaitable[_T]) -> _T:
    """Awaits `work`, cancelling it (which closes the router iterator) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _close(iterator: object) -> None:
    """Closes an async generator (a no-op once it has finished), which runs its cleanup now, not at GC."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _code_for(status: int) -> str | None:
    return {404: "not_found", 405: "method_not_allowed"}.get(status)


def _package_version() -> str:
    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "unknown"
