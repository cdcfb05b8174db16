"""Real clients for the chaos suite (generated gRPC stubs on grpc.aio, httpx on the OpenAI HTTP API) and what
each request ended in.

    exact      it completed, and its tokens (gRPC) or text (HTTP) are the reference's
    error      a clear error: a gRPC status or an HTTP code (or an error object in the stream) with a message
    cancelled  the client itself cancelled or disconnected, as the scenario meant it to
    hung       no answer within its deadline (DEADLINE_EXCEEDED, HTTP 504, or the client's own timeout)
    wrong      it completed with other tokens than the reference's (or ended "abort" nobody asked for)
    unclear    it failed without a clear error: UNKNOWN or INTERNAL, a 5xx other than 503, an empty message
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Literal

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc
from tests.chaos.workload import Reference, Req

Kind = Literal["exact", "error", "cancelled", "hung", "wrong", "unclear"]
KINDS: tuple[Kind, ...] = ("exact", "error", "cancelled", "hung", "wrong", "unclear")

CLEAR_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
})
CLEAR_HTTP = frozenset({400, 401, 403, 404, 408, 413, 422, 429, 503})


@dataclass
class Outcome:
    kind: Kind
    via: str
    seconds: float
    detail: str = ""
    tokens: int = 0  # output tokens (gRPC) or text chunks (HTTP) received
    code: str = ""  # the gRPC status name or HTTP code of an error
    retry_after: str | None = None  # HTTP Retry-After of a 429/503


@dataclass
class Progress:
    """Output received so far, per request, for scenarios that strike once streams are under way."""

    received: dict[int, int] = field(default_factory=dict)

    def at_least(self, count: int, n: int) -> bool:
        return len([v for v in self.received.values() if v >= n]) >= count


def _status_outcome(code: grpc.StatusCode, details: str | None, elapsed: float, via: str = "grpc") -> Outcome:
    name = code.name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Outcome("hung", via, elapsed, details or "", code=name)
    if code in CLEAR_CODES and (details or "").strip():
        return Outcome("error", via, elapsed, details or "", code=name)
    return Outcome("unclear", via, elapsed, f"{name}: {details!r}", code=name)


class Client:
    """One connection of each kind to a deployment; use inside the event loop that runs the scenario."""

    def __init__(self, grpc_target: str, http_base: str, ref: Reference) -> None:
        self.grpc_target, self.http_base, self.ref = grpc_target, http_base, ref
        self.channel = grpc.aio.insecure_channel(grpc_target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.http = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=400))
        self._model: str | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.http.aclose()

    async def model(self) -> str:
        if self._model is None:
            self._model = (await self.http.get(f"{self.http_base}/v1/models")).json()["data"][0]["id"]
        return self._model

    async def load(self, check_integrity: bool = True) -> pb.LoadReport:
        return await self.stub.GetLoad(pb.LoadRequest(check_integrity=check_integrity), timeout=30)

    async def health(self) -> int:
        """grpc.health.v1's status of the whole server (SERVING = 1), or -1 when it cannot be asked."""
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return -1
        return int(reply.status)

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of a family's samples on /metrics whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        text = (await self.http.get(f"{self.http_base}/metrics")).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    async def send(self, req: Req, *, cancel_after: int | None = None, progress: Progress | None = None,
                   channel: grpc.aio.Channel | None = None) -> Outcome:
        """Sends `req` and judges the answer; `cancel_after` tokens (0: at once) the client goes away."""
        if req.via == "grpc":
            return await self._grpc(req, cancel_after, progress, channel or self.channel)
        return await self._http(req, cancel_after, progress)

    async def _grpc(self, req: Req, cancel_after: int | None, progress: Progress | None,
                    channel: grpc.aio.Channel) -> Outcome:
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(request_id=req.request_id, token_ids=pb.TokenIds(ids=req.prompt),
                                     sampling=pb.SamplingParams(temperature=0, max_tokens=req.max_tokens,
                                                                ignore_eos=True))
        start = time.monotonic()
        call = stub.Generate(request, timeout=req.deadline_s)
        tokens: list[int] = []
        finish = ""
        try:
            if cancel_after == 0:
                await asyncio.sleep(0.2)
                call.cancel()
                return Outcome("cancelled", "grpc", time.monotonic() - start)
            async for reply in call:
                if reply.HasField("chunk"):
                    tokens.extend(reply.chunk.token_ids)
                    if progress is not None:
                        progress.received[id(call)] = len(tokens)
                    if cancel_after is not None and len(tokens) >= cancel_after:
                        call.cancel()
                        return Outcome("cancelled", "grpc", time.monotonic() - start, tokens=len(tokens))
                elif reply.HasField("complete"):
                    finish = reply.complete.finish_reason
        except grpc.aio.AioRpcError as e:
            return _status_outcome(e.code(), e.details(), time.monotonic() - start)
        elapsed = time.monotonic() - start
        want = self.ref.tokens(req)
        if finish == "length" and tokens == want:
            return Outcome("exact", "grpc", elapsed, tokens=len(tokens))
        diverged = next((i for i, (a, b) in enumerate(zip(tokens, want, strict=False)) if a != b),
                        min(len(tokens), len(want)))
        return Outcome("wrong", "grpc", elapsed, f"prompt of {len(req.prompt)}: finish {finish!r}, {len(tokens)} "
                       f"tokens, first difference at "
                       f"{diverged}", tokens=len(tokens))

    async def _http(self, req: Req, cancel_after: int | None, progress: Progress | None) -> Outcome:
        body = {"model": await self.model(), "prompt": list(req.prompt), "max_tokens": req.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}
        start = time.monotonic()
        try:
            return await asyncio.wait_for(self._http_stream(req, body, start, cancel_after, progress), req.deadline_s)
        except (TimeoutError, httpx.TimeoutException):
            return Outcome("hung", "http", time.monotonic() - start, "no answer within the deadline")
        except httpx.ConnectError as e:  # nothing listens any more (a router that has stopped): a clear refusal
            return Outcome("error", "http", time.monotonic() - start, f"connection refused: {e}", code="refused")
        except httpx.TransportError as e:  # the server closed the connection without an answer
            return Outcome("unclear", "http", time.monotonic() - start, f"{type(e).__name__}: {e}")

    async def _http_stream(self, req: Req, body: dict[str, object], start: float, cancel_after: int | None,
                           progress: Progress | None) -> Outcome:
        headers = {"X-Request-Timeout": f"{req.deadline_s:g}"}
        if req.request_id:
            headers["X-Request-Id"] = req.request_id
        async with self.http.stream("POST", f"{self.http_base}/v1/completions", json=body, headers=headers,
                                    timeout=req.deadline_s) as resp:
            if resp.status_code != 200:
                return _http_error(resp.status_code, await resp.aread(), time.monotonic() - start,
                                   resp.headers.get("Retry-After"))
            text, chunks, finish = "", 0, ""
            if cancel_after == 0:
                return Outcome("cancelled", "http", time.monotonic() - start)
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return _http_error(200, json.dumps(event).encode(), time.monotonic() - start, None)
                choice = event["choices"][0]
                text += choice.get("text") or ""
                finish = choice.get("finish_reason") or finish
                chunks += 1
                if progress is not None:
                    progress.received[id(resp)] = chunks
                if cancel_after is not None and chunks >= cancel_after:
                    return Outcome("cancelled", "http", time.monotonic() - start, tokens=chunks)
        elapsed = time.monotonic() - start
        if finish == "length" and text == self.ref.text(req):
            return Outcome("exact", "http", elapsed, tokens=chunks)
        want = self.ref.text(req)
        at = next((i for i, (a, b) in enumerate(zip(text, want, strict=False)) if a != b), min(len(text), len(want)))
        return Outcome("wrong", "http", elapsed, f"prompt of {len(req.prompt)}: finish {finish!r}, {chunks} chunks, "
                       f"{len(text)} chars (want {len(want)}), first difference at char {at}: "
                       f"got {text[at:at + 30]!r}, want {want[at:at + 30]!r}", tokens=chunks)


def _http_error(status: int, raw: bytes, elapsed: float, retry_after: str | None) -> Outcome:
    try:
        error = json.loads(raw)["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        message = ""
    if status == 504 or (status == 200 and "deadline" in message.lower()):
        return Outcome("hung", "http", elapsed, message, code=str(status))
    if (status in CLEAR_HTTP or status == 200) and message.strip():
        return Outcome("error", "http", elapsed, message, code=str(status), retry_after=retry_after)
    return Outcome("unclear", "http", elapsed, f"HTTP {status}: {raw[:200]!r}", code=str(status))
