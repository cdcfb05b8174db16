"""Converts between the public protobuf messages and the router's dataclasses."""

from __future__ import annotations

from services.engine.errors import InvalidRequest
from services.engine.sampling_params import SamplingParams
from services.engine.worker_messages import LoadInfo
from services.proto_gen import generation_pb2 as pb
from services.router.router import Chunk, Completion, Event, GenerateInput


def sampling_from_proto(msg: pb.SamplingParams, default_max_tokens: int) -> SamplingParams:
    def opt(name: str):  # type: ignore[no-untyped-def]
        return getattr(msg, name) if msg.HasField(name) else None

    temperature = opt("temperature")
    top_p = opt("top_p")
    top_k = opt("top_k")
    max_tokens = opt("max_tokens")
    if max_tokens == 0:
        raise InvalidRequest("max_tokens must be at least 1, got 0")
    return SamplingParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=-1 if top_k is None else top_k,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        seed=opt("seed"),
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
    )


def input_from_proto(req: pb.GenerateRequest, default_max_tokens: int) -> GenerateInput:
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequest("the request has no input: set text or token_ids")
    return GenerateInput(
        request_id=req.request_id,
        text=req.text if which == "text" else None,
        token_ids=list(req.token_ids.ids) if which == "token_ids" else None,
        params=sampling_from_proto(req.sampling, default_max_tokens),
        priority=req.priority,
    )


def event_to_proto(event: Event) -> pb.GenerateResponse:
    if isinstance(event, Chunk):
        return pb.GenerateResponse(chunk=pb.Chunk(token_ids=event.token_ids, text=event.text))
    assert isinstance(event, Completion)
    usage = pb.Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        cached_tokens=event.cached_tokens,
    )
    return pb.GenerateResponse(complete=pb.Complete(finish_reason=event.finish_reason, usage=usage))


def load_to_proto(name: str, role: str, alive: bool, info: LoadInfo | None) -> pb.WorkerLoad:
    if info is None:
        return pb.WorkerLoad(worker=name, role=role, alive=alive)
    s = info.stats
    return pb.WorkerLoad(
        worker=name,
        role=role,
        num_running=s.num_running,
        num_waiting=s.num_waiting,
        num_free_blocks=s.num_free_blocks,
        num_total_blocks=s.num_total_blocks,
        num_used_blocks=info.num_used_blocks,
        queued_prefill_tokens=s.queued_prefill_tokens,
        kv_cache_usage=s.kv_cache_usage,
        alive=alive,
        integrity_ok=info.integrity_error is None,
        integrity_error=info.integrity_error or "",
        num_reservations=info.num_reservations,
        pid=info.pid,
    )
