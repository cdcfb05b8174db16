"""The OpenAI-compatible HTTP API of a real `pdserve serve` (disagg mode), through the official openai client
(sync and async, streaming and not), httpx for raw status checks, and the gRPC stub as the reference."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from services.engine.config import EngineConfig
from services.engine.tokenizer import Tokenizer
from services.proto_gen import generation_pb2 as pb
from services.router.config import RouterConfig
from services.router.http_server import HttpServer
from services.router.metrics import Metrics
from services.router.openai_protocol import ChatCompletionRequest, chat_prompt_ids
from services.router.pool import PoolSpec, WorkerPools
from services.router.router import Router
from services.transfer.config import TransferConfig
from tests.service.conftest import RunningServer

PROMPT = ("The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea, there "
          "lived an old fisherman who told stories of the storms he had seen, of the ships that never came home, "
          "and of the lighthouse keeper who kept the lamp burning through the longest night of the winter, while "
          "the whole village waited on the harbour wall for the boats to return")
# Longer than a KV block (64 tokens on CPU), so that a repeat hits the prefix cache.
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
MESSAGES: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(disagg_server: RunningServer) -> RunningServer:
    """The shared server once HTTP /health says ready (its workers are up)."""
    return disagg_server.wait_http_ready()


@pytest.fixture(scope="module")
def model_name(server: RunningServer) -> str:
    return httpx.get(f"{server.http_base}/v1/models", timeout=10).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_base}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def aclient(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.http_base}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(serve_model_dir: str) -> Tokenizer:
    return Tokenizer(serve_model_dir)


def grpc_generate(server: RunningServer, **input: Any) -> tuple[list[int], str, pb.Complete]:
    """Greedy, 8 tokens, ignore_eos: the gRPC twin of GREEDY."""
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ids: list[int] = []
    text = ""
    complete = None
    for reply in server.stub().Generate(pb.GenerateRequest(sampling=sampling, **input), timeout=60):
        if reply.HasField("chunk"):
            ids += reply.chunk.token_ids
            text += reply.chunk.text
        else:
            complete = reply.complete
    assert complete is not None
    return ids, text, complete


# ---- in-process: start-up, no workers, draining --------------------------------------------------------


async def test_health_and_503_while_starting_without_workers_and_draining(serve_model_dir: str) -> None:
    """A real Router over pools that were never started: no worker is alive, so generation is UNAVAILABLE."""
    metrics = Metrics(model_name="m")
    pools = WorkerPools(EngineConfig(model=serve_model_dir), TransferConfig(), PoolSpec(1, 1, False), metrics)
    tokenizer = Tokenizer(serve_model_dir)
    router = Router(RouterConfig(max_request_bytes=1000), pools, tokenizer, metrics, tokenizer.vocab_size, 256, 16)
    http = HttpServer(router, metrics, tokenizer, ["m", "m-alias"], "127.0.0.1", 0)
    await http.start()
    try:
        assert http.port > 0
        body = {"model": "m", "prompt": "hello", "max_tokens": 4}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http.port}", timeout=10) as c:
            starting = await c.get("/health")
            assert_error(starting, 503)
            assert "starting" in starting.json()["error"]["message"]
            assert_error(await c.post("/v1/completions", json=body), 503)
            assert (await c.get("/v1/models")).json()["data"][0]["max_model_len"] == 256
            assert_error(await c.post("/tokenize", json={"prompt": "hello"}), 503)
            http.ready = True
            assert (await c.get("/health")).status_code == 200
            cards = (await c.get("/v1/models")).json()["data"]
            assert [(m["id"], m["root"], m["max_model_len"]) for m in cards] == [("m", "m", 256), ("m-alias", "m", 256)]
            assert (await c.get("/v1/models/m-alias")).json()["id"] == "m-alias"
            missing = assert_error(await c.get("/v1/models/other"), 404)
            assert "`m`, `m-alias`" in missing["message"]
            tokens = (await c.post("/tokenize", json={"model": "m-alias", "prompt": "hello"})).json()
            assert tokens == {"count": len(tokenizer.encode("hello")), "max_model_len": 256,
                              "tokens": tokenizer.encode("hello"), "token_strs": None}
            assert_error(await c.post("/tokenize", json={"model": "other", "prompt": "hello"}), 404, "model")
            no_workers = await c.post("/v1/completions", json=body)
            assert "no decode worker" in assert_error(no_workers, 503)["message"]
            alias = await c.post("/v1/completions", json={**body, "model": "m-alias"})
            assert "no decode worker" in assert_error(alias, 503)["message"]
            assert no_workers.headers["retry-after"] == "1"
            assert_error(await c.post("/v1/chat/completions", json={**body, "stream": True, "messages": MESSAGES}),
                         503)
            assert_error(await c.post("/v1/completions", json={"model": "m", "prompt": "x" * 2000}), 413)
            assert_error(await c.post("/v1/completions", json={"model": "m", "prompt": 5}), 400, "prompt")
            http.draining = True
            assert "draining" in assert_error(await c.get("/health"), 503)["message"]
            assert_error(await c.post("/v1/completions", json=body), 503)
        assert not router.active
    finally:
        await http.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{http.port}/health", timeout=2)


# ---- completions ---------------------------------------------------------------------------------------


def test_completion_matches_grpc_for_the_same_greedy_request(server: RunningServer, client: openai.OpenAI,
                                                             model_name: str, tokenizer: Tokenizer) -> None:
    ids, grpc_text, complete = grpc_generate(server, text=PROMPT)
    out = client.completions.create(model=model_name, prompt=PROMPT, **GREEDY)
    choice = out.choices[0]
    assert choice.text == grpc_text == tokenizer.decode(ids)
    assert choice.finish_reason == "length" == complete.finish_reason
    assert out.model == model_name and out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (complete.usage.prompt_tokens, 8)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    # A token-id prompt (BOS included, as the text prompt is encoded) gives the same tokens, from the prefix cache.
    by_ids = client.completions.create(model=model_name, prompt=tokenizer.encode(PROMPT), **GREEDY)
    assert by_ids.choices[0].text == grpc_text
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens_details is not None
    assert by_ids.usage.prompt_tokens_details.cached_tokens > 0


async def test_async_streaming_completion_with_usage(client: openai.OpenAI, aclient: openai.AsyncOpenAI,
                                                     model_name: str) -> None:
    whole = client.completions.create(model=model_name, prompt=PROMPT, **GREEDY)
    stream = await aclient.completions.create(model=model_name, prompt=PROMPT, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY)
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert len(chunks) > 3  # really streamed, not one blob
    no_usage = [c async for c in await aclient.completions.create(model=model_name, prompt=PROMPT, stream=True,
                                                                   **GREEDY)]
    assert all(c.usage is None and c.choices for c in no_usage)


def test_top_k_and_stop(client: openai.OpenAI, model_name: str) -> None:
    greedy = client.completions.create(model=model_name, prompt=PROMPT, **GREEDY).choices[0].text
    # Sampling at temperature 1 restricted to the top-1 token is greedy: proof that top_k reaches the sampler.
    top1 = client.completions.create(model=model_name, prompt=PROMPT, temperature=1.0, seed=7, max_tokens=8,
                                     extra_body={"top_k": 1, "ignore_eos": True})
    assert top1.choices[0].text == greedy
    stop = greedy.strip()[2:5]
    assert stop and stop in greedy
    cut = client.completions.create(model=model_name, prompt=PROMPT, stop=[stop], **GREEDY).choices[0]
    assert cut.text == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"


def test_max_tokens_defaults_to_the_rest_of_the_context(client: openai.OpenAI, model_name: str,
                                                        server: RunningServer) -> None:
    max_len = httpx.get(f"{server.http_base}/v1/models", timeout=10).json()["data"][0]["max_model_len"]
    prompt = [(i * 7919) % 4000 + 10 for i in range(max_len - 3)]
    out = client.completions.create(model=model_name, prompt=prompt, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    assert out.usage is not None and out.usage.prompt_tokens == max_len - 3
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


# ---- chat ------------------------------------------------------------------------------------------------


def test_chat_uses_the_template_with_one_bos_and_matches_grpc(server: RunningServer, client: openai.OpenAI,
                                                              model_name: str, tokenizer: Tokenizer) -> None:
    ids = chat_prompt_ids(tokenizer, ChatCompletionRequest.model_validate({"messages": MESSAGES}))
    bos_id = tokenizer.encode("x")[0]
    assert ids.count(bos_id) == 1
    _, grpc_text, _ = grpc_generate(server, token_ids=pb.TokenIds(ids=ids))
    out = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)  # type: ignore[arg-type]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == grpc_text
    assert out.usage is not None and out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 8
    newer = client.chat.completions.create(model=model_name, messages=MESSAGES,  # type: ignore[arg-type]
                                           temperature=0.0, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert newer.usage is not None and newer.usage.completion_tokens == 3
    assert grpc_text.startswith(newer.choices[0].message.content or "")


async def test_async_streaming_chat_with_usage(client: openai.OpenAI, aclient: openai.AsyncOpenAI,
                                               model_name: str) -> None:
    whole = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)  # type: ignore[arg-type]
    stream = await aclient.chat.completions.create(model=model_name, messages=MESSAGES, stream=True,  # type: ignore
                                                   stream_options={"include_usage": True}, **GREEDY)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()  # type: ignore[union-attr]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_sync_streaming_chat(client: openai.OpenAI, model_name: str) -> None:
    whole = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)  # type: ignore[arg-type]
    with client.chat.completions.create(model=model_name, messages=MESSAGES, stream=True,  # type: ignore
                                        **GREEDY) as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content


# ---- errors ----------------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "hi", "n": 0}, None),
    ({"prompt": "hi", "best_of": 2}, "best_of"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),  # pydantic's error: 400, not FastAPI's 422
    ({"prompt": ["a", "b"]}, None),
    ({"prompt": "hi", "max_tokens": 0}, None),
    ({"prompt": "hi", "max_tokens": 5000}, None),  # over the context
    ({"prompt": [999999]}, None),  # outside the vocabulary
    ({"prompt": "hi", "logprobs": 21}, None),
    ({"prompt": "hi", "guided_regex": "a+"}, "guided_regex"),
    ({}, "prompt"),
])
def test_bad_completion_parameters_are_400(server: RunningServer, model_name: str, body: dict[str, Any],
                                           param: str | None) -> None:
    r = httpx.post(f"{server.http_base}/v1/completions", json={"model": model_name, **body}, timeout=30)
    assert_error(r, 400, param)


def test_bad_chat_requests_and_client_errors(server: RunningServer, client: openai.OpenAI, model_name: str) -> None:
    url = f"{server.http_base}/v1/chat/completions"
    assert_error(httpx.post(url, json={"model": model_name, "messages": []}, timeout=30), 400)
    assert_error(httpx.post(url, json={"model": model_name, "messages": [{"role": "x", "content": "y"}]},
                            timeout=30), 400)
    assert_error(httpx.post(url, content=b"{not json", timeout=30), 400)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=model_name, messages=MESSAGES,  # type: ignore[arg-type]
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore[arg-type]


def test_unknown_model_and_path_are_404(server: RunningServer) -> None:
    error = assert_error(httpx.post(f"{server.http_base}/v1/completions", json={"model": "gpt-9", "prompt": "x"},
                                    timeout=30), 404, "model")
    assert error["code"] == "model_not_found"
    assert_error(httpx.get(f"{server.http_base}/v1/models/gpt-9", timeout=10), 404)
    assert_error(httpx.get(f"{server.http_base}/v1/nothing-here", timeout=10), 404)


def test_oversized_bodies_are_413(server: RunningServer, model_name: str) -> None:
    big = "a" * (5 * 2**20)  # over the default max_request_bytes of 4 MiB
    url = f"{server.http_base}/v1/completions"
    assert_error(httpx.post(url, json={"model": model_name, "prompt": big}, timeout=60), 413)

    def chunked() -> Any:  # no Content-Length: the limit is enforced on the bytes actually read
        yield b'{"prompt": "'
        for _ in range(5 * 16):
            yield b"a" * 2**16
        yield b'"}'

    assert_error(httpx.post(url, content=chunked(), timeout=60), 413)


# ---- the other endpoints, and disconnects -------------------------------------------------------------


def test_models_health_version_and_metrics(server: RunningServer, client: openai.OpenAI, model_name: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert client.models.retrieve(model_name).id == model_name
    health = httpx.get(f"{server.http_base}/health", timeout=10)
    assert health.status_code == 200
    version = httpx.get(f"{server.http_base}/version", timeout=10).json()
    assert isinstance(version["version"], str) and version["version"]
    client.completions.create(model=model_name, prompt=PROMPT, **GREEDY)
    metrics = httpx.get(f"{server.http_base}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    success = [line for line in metrics.text.splitlines()
               if line.startswith("pdserve_request_success_total{") and 'finished_reason="length"' in line]
    assert success and float(success[0].rsplit(" ", 1)[1]) >= 1
    assert "pdserve_time_to_first_token_seconds_count" in metrics.text


def test_client_disconnect_mid_stream_frees_the_request(server: RunningServer, model_name: str) -> None:
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 1500, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.http_base}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        assert server.load(check_integrity=False).num_inflight_requests == 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        load = server.load()
        if load.num_inflight_requests == 0 and all(w.num_running == 0 and w.num_used_blocks == 0
                                                   for w in load.workers):
            break
        time.sleep(0.2)
    assert load.num_inflight_requests == 0, load
    assert all(w.num_running == 0 and w.num_used_blocks == 0 and w.integrity_ok for w in load.workers), load
