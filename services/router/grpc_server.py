"""The gRPC front end: a thin servicer over the Router, plus health and reflection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.engine.errors import InvalidRequest, ResourceExhausted
from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc
from services.router import convert
from services.router.auth import ApiKeys, Security, TlsFiles
from services.router.errors import Unavailable
from services.router.grpc_calls import add_generation_servicer, caller_identity
from services.router.router import Router

SERVICE_NAME = "pdserve.v1.Generation"
# gRPC itself refuses messages over this; the servicer refuses those over max_request_bytes with a clearer error.
TRANSPORT_LIMIT = 64 * 2**20

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
]


def status_for(error: BaseException) -> grpc.StatusCode:
    return next((code for kind, code in _CODES if isinstance(error, kind)), grpc.StatusCode.INTERNAL)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, model_name: str, dtype: str, eos_token_id: int) -> None:
        self.router = router
        self.model_name = model_name
        self.dtype = dtype
        self.eos_token_id = eos_token_id

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        size = request.ByteSize()
        limit = self.router.config.max_request_bytes
        try:
            if size > limit:
                raise InvalidRequest(f"the request is {size} bytes, over the limit of {limit} bytes")
            inp = convert.input_from_proto(request, self.router.config.default_max_tokens,
                                           self.router.sampling_defaults)
            inp.owner = caller_identity(context)
            # The client's deadline, if it set one, is the request's (admission.py).
            async for event in self.router.generate(inp, context.time_remaining()):
                yield convert.event_to_proto(event)
        except (InvalidRequest, ResourceExhausted, Unavailable, TimeoutError) as e:
            await context.abort(status_for(e), str(e))

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:  # noqa: N802
        """Aborts a request of the same caller (grpc_calls.caller_identity). Another caller's request is answered
        as an unknown id (found = false), so that Abort neither acts on nor reveals the ids of others."""
        return pb.AbortResponse(found=self.router.abort(request.request_id, caller_identity(context)))

    async def GetModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        r = self.router
        return pb.ModelInfo(
            model=self.model_name,
            vocab_size=r.vocab_size,
            max_model_len=r.max_model_len,
            dtype=self.dtype,
            mode=r.config.mode,
            block_size=r.block_size,
            eos_token_id=self.eos_token_id,
        )

    async def Tokenize(  # noqa: N802
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = self.router.tokenizer.encode(request.text, add_special_tokens=add_special)
        return pb.TokenizeResponse(ids=ids, max_model_len=self.router.max_model_len)

    async def Detokenize(  # noqa: N802
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        vocab = self.router.vocab_size
        bad = next((t for t in request.ids if t >= vocab), None)
        if bad is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token id {bad} is outside the vocabulary [0, {vocab})")
        return pb.DetokenizeResponse(text=self.router.tokenizer.decode(list(request.ids)))

    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:  # noqa: N802
        workers = self.router.pools.all

        async def one(w):  # type: ignore[no-untyped-def]
            try:
                info = await asyncio.wait_for(w.actor.load.remote(request.check_integrity, False), 10)
            except Exception:  # noqa: BLE001 - an unreachable worker is reported, not raised
                return convert.load_to_proto(w.name, w.role, False, None)
            # Alive: answering, and the incarnation the router dispatches to. An actor that Ray has
            # restarted is not, until the pool's next poll has learnt its new KV address.
            known = w.last_load is None or w.last_load.pid == info.pid
            load = convert.load_to_proto(w.name, w.role, w.alive and known, info)
            load.kv_address = (w.kv_address or "") if known else ""
            return load

        loads = await asyncio.gather(*(one(w) for w in workers))
        return pb.LoadReport(workers=loads, num_inflight_requests=len(self.router.active))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without a valid `authorization: Bearer KEY` metadata entry with UNAUTHENTICATED, unless
    its method is open (auth.ApiKeys decides: health and reflection, by default)."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or self.keys.grpc_method_open(details.method):
            return handler
        metadata = details.invocation_metadata or ()
        authorization = next((str(m.value) for m in metadata if m.key == "authorization"), None)
        refusal = self.keys.refusal(authorization)
        return handler if refusal is None else _refusing(handler, refusal)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[handler.request_streaming, handler.response_streaming](
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    cert, key, client_ca = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


@dataclass(frozen=True)
class GrpcServer:
    """A built, not yet started, gRPC server: its health servicer and the port it bound."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int


def build_server(servicer: GenerationServicer, host: str, port: int, security: Security | None = None) -> GrpcServer:
    """A server with Generation, grpc.health.v1 and reflection on host:port (0 picks a free port), over TLS and
    behind API keys when `security` says so; health starts NOT_SERVING."""
    security = security or Security()
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(security.api_keys)] if security.api_keys.enabled else None,
        options=[
            ("grpc.max_receive_message_length", TRANSPORT_LIMIT),
            ("grpc.max_send_message_length", TRANSPORT_LIMIT),
        ],
    )
    add_generation_servicer(servicer, server)  # undecodable requests: INVALID_ARGUMENT, not UNKNOWN
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"  # IPv6
    if security.tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, server_credentials(security.tls))
    return GrpcServer(server, health_servicer, bound)
