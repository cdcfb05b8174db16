"""What the Generation servicer learns from a call before the router sees it: the request message, and who sent it.

Messages: the generated `add_GenerationServicer_to_server` registers `FromString` as each method's deserializer,
and grpc.aio runs it before the servicer; bytes that do not parse (garbage, or a `string` field that is not
UTF-8) then fail the call with UNKNOWN and a logged traceback. `add_generation_servicer` registers the same
methods with a deserializer that turns such bytes into an `Undecodable`, which the method answers with
INVALID_ARGUMENT and the parser's message.

Callers: `caller_identity` names who may abort a request (Generate records it, Abort compares it). A call with
`authorization: Bearer KEY` metadata is identified by a SHA-256 digest of the key, so every connection with the
same key is the same caller; a call without one by its connection (`context.peer()`).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from services.proto_gen import generation_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"]


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that are not a valid message of the method's request type."""

    message: str


def request_parser(message_type: Any) -> Callable[[bytes], Any]:
    """A deserializer that returns the message, or an Undecodable where `message_type.FromString` fails."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as e:  # noqa: BLE001 - any bytes that do not parse are the client's error
            return Undecodable(f"cannot parse the request as {message_type.DESCRIPTOR.full_name}: {e}")

    return parse


def _checked_unary(method: Callable[[Any, grpc.aio.ServicerContext], Any]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handle


def _checked_stream(method: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for reply in method(request, context):
            yield reply

    return handle


def add_generation_servicer(servicer: Any, server: grpc.aio.Server) -> None:
    """Registers every method of pdserve.v1.Generation, as the generated function does, with request_parser."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        behaviour = getattr(servicer, method.name)
        parse = request_parser(getattr(pb, method.input_type.name))
        serialize = getattr(pb, method.output_type.name).SerializeToString
        assert not method.client_streaming, f"{method.name}: client streaming is not handled here"
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _checked_stream(behaviour), request_deserializer=parse, response_serializer=serialize)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _checked_unary(behaviour), request_deserializer=parse, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def caller_identity(context: grpc.aio.ServicerContext) -> str:
    """"key:<sha256 hex>" for a call with a bearer key, else "peer:<the connection's address>"."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()
    return "peer:" + context.peer()
