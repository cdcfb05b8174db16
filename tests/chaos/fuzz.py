"""Bad input on HTTP and gRPC: malformed and oversized bodies, and request schemas drawn by hypothesis.

A server under fuzz answers every request with a well-formed completion or a clear error: a 4xx with
OpenAI's error object (never a 5xx), a gRPC status with a message (INVALID_ARGUMENT and the like, never
UNKNOWN or INTERNAL); and it keeps serving.
"""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc
from tests.chaos.client import CLEAR_CODES, CLEAR_HTTP, Outcome
from tests.chaos.deployment import Deployment
from tests.chaos.invariants import ScenarioResult

GENERATE = "/pdserve.v1.Generation/Generate"


def _http_outcome(reply: httpx.Response, elapsed: float) -> Outcome:
    if reply.status_code == 200:
        body = reply.json()
        choices = body.get("choices") or []
        ok = bool(choices) and all(isinstance(c.get("text"), str) and c.get("finish_reason") in ("stop", "length")
                                   for c in choices)
        return Outcome("exact" if ok else "wrong", "http", elapsed, "" if ok else f"malformed answer {body}"[:200])
    try:
        message = reply.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = ""
    kind = "error" if reply.status_code in CLEAR_HTTP and message.strip() else "unclear"
    return Outcome(kind, "http", elapsed, message or reply.text[:200], code=str(reply.status_code))


def _grpc_outcome(call: Any, elapsed: float) -> Outcome:
    try:
        replies = list(call)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        kind = "error" if code in CLEAR_CODES and details.strip() else "unclear"
        return Outcome(kind, "grpc", elapsed, details[:200], code=code.name)
    ok = bool(replies) and replies[-1].HasField("complete")
    return Outcome("exact" if ok else "wrong", "grpc", elapsed, "" if ok else "no Complete at the end")


class Fuzzer:
    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.http = httpx.Client(base_url=dep.http_base, timeout=60)
        self.channel = grpc.insecure_channel(dep.grpc_target, options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.model = self.http.get("/v1/models").json()["data"][0]["id"]
        self.outcomes: list[Outcome] = []

    def close(self) -> None:
        self.http.close()
        self.channel.close()

    def post(self, path: str, content: bytes | None = None, body: Any = None) -> Outcome:
        start = time.monotonic()
        if body is not None:
            content = json.dumps(body).encode()
        reply = self.http.post(path, content=content, headers={"Content-Type": "application/json"})
        outcome = _http_outcome(reply, time.monotonic() - start)
        self.outcomes.append(outcome)
        return outcome

    def generate(self, request: pb.GenerateRequest | bytes) -> Outcome:
        start = time.monotonic()
        if isinstance(request, bytes):  # raw bytes on the wire, whatever they decode to
            call = self.channel.unary_stream(GENERATE)(request, timeout=30)
        else:
            call = self.stub.Generate(request, timeout=30)
        outcome = _grpc_outcome(call, time.monotonic() - start)
        self.outcomes.append(outcome)
        return outcome

    # ---- malformed and oversized --------------------------------------------------------------------
    def malformed(self) -> dict[str, Outcome]:
        """Each case's outcome, by name; every one must be a clear error."""
        base = {"model": self.model, "prompt": "Hello", "max_tokens": 4}
        text_field = pb.GenerateRequest(text="hi").SerializeToString()
        cases = {
            "http 10 MB body": lambda: self.post("/v1/completions", body={**base, "prompt": "a" * (10 << 20)}),
            "http JSON nested 100,000 deep": lambda: self.post("/v1/completions",
                                                               content=b'{"prompt":' + b"[" * 100_000 + b"]" * 100_000
                                                               + b"}"),
            "http invalid UTF-8": lambda: self.post(
                "/v1/completions", content=b'{"model": "m", "prompt": "\xff\xfe\xfa", "max_tokens": 2}'),
            "http 1,000 stop strings": lambda: self.post("/v1/completions",
                                                         body={**base, "stop": [f"s{i}" for i in range(1000)]}),
            "http chat JSON nested 100,000 deep": lambda: self.post("/v1/chat/completions",
                                                                    content=b'{"messages":' + b"[" * 100_000
                                                                    + b"]" * 100_000 + b"}"),
            "grpc garbage bytes": lambda: self.generate(bytes(range(256)) * 4),
            "grpc invalid UTF-8 text": lambda: self.generate(text_field.replace(b"hi", b"\xff\xfe")),
            "grpc 10 MB text": lambda: self.generate(pb.GenerateRequest(text="a" * (10 << 20))),
            "grpc 1,000 stop strings": lambda: self.generate(pb.GenerateRequest(
                text="hi", sampling=pb.SamplingParams(max_tokens=2, stop=[f"s{i}" for i in range(1000)]))),
        }
        return {name: case() for name, case in cases.items()}

    def duplicate_ids(self) -> tuple[Outcome, Outcome]:
        """Two requests under one id at once: the first runs, the second is refused (INVALID_ARGUMENT)."""
        request = pb.GenerateRequest(request_id="chaos-duplicate", token_ids=pb.TokenIds(ids=list(range(20, 220))),
                                     sampling=pb.SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        first = self.stub.Generate(request, timeout=60)
        next(first)  # it is running
        second = self.generate(request)
        start = time.monotonic()
        outcome = _grpc_outcome(first, time.monotonic() - start)
        self.outcomes.append(outcome)
        return outcome, second

    # ---- schemas by hypothesis --------------------------------------------------------------------
    def schemas(self, examples: int) -> list[str]:
        """Draws completions and gRPC requests with odd but typed fields; returns what hypothesis found wrong."""
        found: list[str] = []
        limits = settings(max_examples=examples, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))

        @limits
        @given(completion_bodies(self.model))
        def http_case(body: dict[str, Any]) -> None:
            outcome = self.post("/v1/completions", body=body)
            assert outcome.kind in ("exact", "error"), f"{body} -> {outcome}"

        @limits
        @given(grpc_requests())
        def grpc_case(request: pb.GenerateRequest) -> None:
            outcome = self.generate(request)
            assert outcome.kind in ("exact", "error"), f"{request} -> {outcome}"

        for case in (http_case, grpc_case):
            try:
                case()
            except AssertionError as e:
                found.append(str(e)[:400])
        return found


_odd_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-5, 5))
_odd_ints = st.one_of(st.integers(-5, 12), st.integers(-(2**63), 2**64))
_prompt = st.one_of(st.text(max_size=40), st.lists(st.integers(-10, 9000), max_size=40),
                    st.lists(st.text(max_size=10), max_size=3), st.none(), st.integers())


def completion_bodies(model: str) -> st.SearchStrategy[dict[str, Any]]:
    optional = {
        "max_tokens": _odd_ints, "temperature": _odd_floats, "top_p": _odd_floats, "top_k": _odd_ints,
        "n": st.integers(-1, 2), "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=5)),
        "seed": _odd_ints, "logprobs": st.one_of(st.integers(-1, 25), st.booleans()), "echo": st.booleans(),
        "presence_penalty": _odd_floats, "logit_bias": st.dictionaries(st.text(max_size=6), _odd_floats, max_size=3),
        "ignore_eos": st.booleans(), "min_tokens": _odd_ints,
    }
    names = st.one_of(st.just(model), st.just(model), st.text(max_size=8))
    return st.fixed_dictionaries({"model": names, "prompt": _prompt}, optional=optional)


def grpc_requests() -> st.SearchStrategy[pb.GenerateRequest]:
    def build(text: str | None, ids: list[int] | None, rid: str, max_tokens: int | None, temperature: float | None,
              top_p: float | None, top_k: int | None, stop: list[str]) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(stop=stop)
        for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                            ("top_k", top_k)):
            if value is not None:
                setattr(sampling, name, value)
        request = pb.GenerateRequest(request_id=rid, sampling=sampling)
        if text is not None:
            request.text = text
        elif ids is not None:
            request.token_ids.ids.extend(ids)
        return request

    return st.builds(build, st.one_of(st.none(), st.text(max_size=40)),
                     st.one_of(st.none(), st.lists(st.integers(0, 2**32 - 1), max_size=40)),
                     st.text(max_size=12), st.one_of(st.none(), st.integers(0, 12), st.integers(2**31, 2**32 - 1)),
                     st.one_of(st.none(), st.floats(width=32)), st.one_of(st.none(), st.floats(width=32)),
                     st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)), st.lists(st.text(max_size=4), max_size=4))


def fuzz(dep: Deployment, examples: int) -> ScenarioResult:
    """The whole fuzz as one scenario: malformed cases, duplicate ids, `examples` drawn schemas per API."""
    result = ScenarioResult(f"fuzz (hypothesis ×{examples} per API, malformed)", dep.topology)
    result.recovery_expected = False
    fuzzer = Fuzzer(dep)
    try:
        for name, outcome in fuzzer.malformed().items():
            result.checks[f"{name}: clear error ({outcome.code})"] = outcome.kind == "error"
        first, second = fuzzer.duplicate_ids()
        result.checks["duplicate request id: the first runs"] = first.kind == "exact"
        result.checks[f"duplicate request id: the second refused ({second.code})"] = \
            second.code == "INVALID_ARGUMENT"
        result.problems += [f"hypothesis: {f}" for f in fuzzer.schemas(examples)]
        result.outcomes = fuzzer.outcomes
    finally:
        fuzzer.close()
    return result

