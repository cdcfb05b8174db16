"""The OpenAI-compatible HTTP front end (FastAPI on uvicorn), the HTTP twin of grpc_server.

    POST /v1/completions, /v1/chat/completions   JSON, or SSE when "stream": true
    POST /tokenize, /detokenize                  vLLM's shapes
    GET  /v1/models, /v1/models/{id}, /health, /metrics, /version

The server answers to each of its served model names (--served-model-name NAME [ALIAS...]); a response names the
model the request named, or the first name.

Status codes: 400 bad parameters (pydantic errors included), 404 unknown model or path, 413 body over
router.config.max_request_bytes, 429 ResourceExhausted (the router's admission queue full, with Retry-After),
503 while starting or draining and on Unavailable, 504 when the request's deadline passes (an
`X-Request-Timeout: SECONDS` header, or --request-timeout-s; after a stream has started, an error object in it),
401 without a valid API key when keys are configured (services/router/auth.py says which paths need one); every
error body is OpenAI's `{"error": {"message", "type", "param", "code"}}`. With TLS files it
serves HTTPS, and with a client CA it requires client certificates.
The router's generate iterator is always closed when a client goes away (streaming or not), which aborts the
request and frees its KV on both sides. uvicorn runs as a task on the caller's event loop and leaves signal
handling to `pdserve serve`, which drains before it calls stop().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Generator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from services.engine.errors import InvalidRequest, ResourceExhausted
from services.engine.tokenizer import Tokenizer
from services.router.admission import REQUEST_TIMEOUT_HEADER, parse_timeout
from services.router.auth import ApiKeys, Security
from services.router.errors import Unavailable
from services.router.http_errors import HttpError, code_for, error_response, http_error_for, validation_error
from services.router.http_stream import (
    ClientGone,
    EventStream,
    close_iterator,
    collect,
    stream_events,
    until_disconnect,
)
from services.router.json_body import parse_json_object
from services.router.messages import GenerateInput
from services.router.metrics import Metrics
from services.router.openai_format import ChatFormat, CompletionFormat, LogprobOptions
from services.router.openai_logprobs import TokenText
from services.router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    chat_prompt_ids,
)
from services.router.openai_responses import DetokenizeResponse, ModelCard, ModelList, TokenizeResponse, new_id, now
from services.router.router import Router

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A body over the limit is still read (and dropped) up to this size, so the client reads the 413 rather than
# a connection reset; anything larger gets the 413 at once.
DRAIN_LIMIT = 64 * 2**20
_T = TypeVar("_T")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own SIGINT/SIGTERM handlers: `pdserve serve` owns the signals and the drain."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ApiKeyMiddleware:
    """Answers 401 (OpenAI's invalid_api_key, `WWW-Authenticate: Bearer`) to a request for a path that needs a key
    and lacks a valid `Authorization: Bearer KEY` header; passes every other request through."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.keys.http_path_open(scope["path"]):
            refusal = self.keys.refusal(Headers(scope=scope).get("authorization"))
            if refusal is not None:
                response = error_response(HttpError(401, refusal, type="authentication_error", code="invalid_api_key"))
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HttpServer:
    """Serves the API on host:port (0 picks a free port; the bound one is `port` after start())."""

    def __init__(self, router: Router, metrics: Metrics, tokenizer: Tokenizer, model_names: Sequence[str], host: str,
                 port: int, security: Security | None = None) -> None:
        """`model_names`: the served names, the first the main one. `security`: API keys and TLS (default none)."""
        self.router = router
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.token_text = TokenText(tokenizer)
        self.model_names = [model_names] if isinstance(model_names, str) else list(model_names)
        if not self.model_names:
            raise ValueError("the HTTP server needs at least one served model name")
        self.host = host
        self.port = port
        self.security = security or Security()
        self.ready = False
        self.draining = False
        self.created = now()
        self.version = _package_version()
        self.app = self._build_app()
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        tls = self.security.tls.uvicorn_options() if self.security.tls is not None else {}
        config = uvicorn.Config(self.app, host=self.host, port=self.port, lifespan="off", log_config=None,
                                log_level="warning", access_log=False, timeout_graceful_shutdown=5, **tls)
        sock = config.bind_socket()
        self.port = sock.getsockname()[1]
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("OpenAI HTTP API on %s://%s:%d", "https" if tls else "http", self.host, self.port)

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
                return error_response(HttpError(e.status_code, str(e.detail), code=code_for(e.status_code)))
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
        if self.security.api_keys.enabled:
            app.add_middleware(ApiKeyMiddleware, keys=self.security.api_keys)
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
        return parse_json_object(await self._read_body(request))

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
        events = self.router.generate(inp, parse_timeout(request.headers.get(REQUEST_TIMEOUT_HEADER)))
        try:
            if not stream:
                outputs = await until_disconnect(request.receive, collect(events, fmt.n))
                return JSONResponse(fmt.response(outputs).model_dump())
            # The first event is awaited before the 200 goes out, so bad input and overload get their status.
            first = await until_disconnect(request.receive, anext(events))
        except ClientGone:
            await close_iterator(events)
            return Response(status_code=499)
        except BaseException:
            await close_iterator(events)
            raise
        return EventStream(stream_events(events, first, fmt, include_usage))


async def _body_parts(request: Request) -> AsyncIterator[bytes]:
    try:
        async for part in request.stream():
            yield part
    except ClientDisconnect:
        raise HttpError(400, "the client disconnected while sending the body", code="client_disconnected") from None


def _package_version() -> str:
    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "unknown"
