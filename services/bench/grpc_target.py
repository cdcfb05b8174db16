"""pdserve's gRPC API as a benchmark target: grpc.aio with the generated stub, one channel for every stream."""

from __future__ import annotations

import grpc

from services.bench.prompt import BenchRequest, Reply
from services.bench.target_base import Outcome, StreamTimer, Target, TargetInfo
from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc


class GrpcTarget(Target):
    def __init__(self, address: str, timeout_s: float) -> None:
        self.url = f"grpc://{address}"
        self.address = address
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GenerationStub | None = None

    async def open(self) -> TargetInfo:
        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = pb_grpc.GenerationStub(self._channel)
        try:
            info = await self._stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
        except grpc.aio.AioRpcError as e:
            await self.close()
            raise ConnectionError(f"no pdserve gRPC server at {self.address}: {e.code().name}: {e.details()}") from e
        return TargetInfo(info.model, info.vocab_size or None, info.max_model_len or None, info.eos_token_id)

    def _message(self, request: BenchRequest, temperature: float) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(temperature=temperature, max_tokens=request.max_tokens, ignore_eos=True)
        if request.token_ids is not None:
            return pb.GenerateRequest(token_ids=pb.TokenIds(ids=request.token_ids), sampling=sampling)
        if request.text is not None:
            return pb.GenerateRequest(text=request.text, sampling=sampling)
        raise ValueError("a gRPC request needs token ids or text")

    async def generate(self, request: BenchRequest, temperature: float) -> Outcome:
        if self._stub is None:
            raise RuntimeError("GrpcTarget.generate before open()")
        message = self._message(request, temperature)
        timer = StreamTimer()
        ids: list[int] = []
        text: list[str] = []
        complete: pb.Complete | None = None
        try:
            async for response in self._stub.Generate(message, timeout=self.timeout_s):
                if response.HasField("chunk"):
                    if response.chunk.token_ids:
                        timer.chunk()
                    ids.extend(response.chunk.token_ids)
                    text.append(response.chunk.text)
                elif response.HasField("complete"):
                    complete = response.complete
        except grpc.aio.AioRpcError as e:
            return timer.fail(f"{e.code().name}: {e.details()}")
        if complete is None:
            return timer.fail("the stream ended without a Complete message")
        if complete.finish_reason == "abort":
            return timer.fail("aborted by the server")
        usage = complete.usage
        prompt_tokens = usage.prompt_tokens or request.expected_prompt_tokens
        return timer.succeed(prompt_tokens, usage.completion_tokens or len(ids), Reply("".join(text), tuple(ids)))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
