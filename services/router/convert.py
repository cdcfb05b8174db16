"""Converts between the public protobuf messages and the router's dataclasses."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from services.engine.errors import InvalidRequest
from services.engine.logprobs import TokenLogprob
from services.engine.sampling_params import SamplingParams
from services.proto_gen import generation_pb2 as pb
from services.router.messages import Chunk, Completion, Event, GenerateInput
from services.worker.messages import LoadInfo

# SamplingParams fields whose proto field is `optional`: unset takes the model's default, then SamplingParams'.
_OPTIONAL = ("temperature", "top_p", "top_k", "seed", "n", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "min_p", "min_tokens", "logprobs", "prompt_logprobs")


def sampling_from_proto(msg: pb.SamplingParams, default_max_tokens: int,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
    """`defaults` (the model's generation config) fill the optional fields the message leaves unset."""
    _refuse_unknown(msg, "SamplingParams")
    values: dict[str, Any] = {name: v for name, v in (defaults or {}).items() if name in _OPTIONAL}
    values.update({name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)})
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens
    if max_tokens == 0:
        raise InvalidRequest("max_tokens must be at least 1, got 0")
    return SamplingParams.from_dict({
        **values,
        "max_tokens": max_tokens,
        "stop": tuple(msg.stop),
        "stop_token_ids": tuple(msg.stop_token_ids),
        "ignore_eos": msg.ignore_eos,
        "logit_bias": tuple(msg.logit_bias.items()),
    })


def _refuse_unknown(msg: Message, name: str) -> None:
    """Fields this server's proto does not have would be dropped in silence: refuse them by number."""
    numbers = sorted({field.field_number for field in UnknownFieldSet(msg)})
    if numbers:
        raise InvalidRequest(f"{name} has field(s) {', '.join(map(str, numbers))} that this server does not know; "
                             "it would ignore them, so the request is refused")


def input_from_proto(req: pb.GenerateRequest, default_max_tokens: int,
                     defaults: dict[str, Any] | None = None) -> GenerateInput:
    _refuse_unknown(req, "GenerateRequest")
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequest("the request has no input: set text or token_ids")
    return GenerateInput(
        request_id=req.request_id,
        text=req.text if which == "text" else None,
        token_ids=list(req.token_ids.ids) if which == "token_ids" else None,
        params=sampling_from_proto(req.sampling, default_max_tokens, defaults),
        priority=req.priority,
    )


def event_to_proto(event: Event) -> pb.GenerateResponse:
    if isinstance(event, Chunk):
        chunk = pb.Chunk(token_ids=event.token_ids, text=event.text, index=event.index,
                         logprobs=[logprob_to_proto(lp) for lp in event.logprobs or []],
                         prompt_logprobs=[logprob_to_proto(lp) for lp in event.prompt_logprobs or [] if lp])
        return pb.GenerateResponse(chunk=chunk)
    assert isinstance(event, Completion)
    usage = pb.Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        cached_tokens=event.cached_tokens,
    )
    return pb.GenerateResponse(complete=pb.Complete(finish_reason=event.finish_reason, usage=usage,
                                                    index=event.index))


def logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    top = [pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank, top=top)


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
        node_ip=info.node_ip,
    )
