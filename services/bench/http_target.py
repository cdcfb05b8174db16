"""Any OpenAI-compatible server as a benchmark target: streaming /v1/completions or /v1/chat/completions over
httpx, server-sent events parsed by hand, usage taken from the final chunk (stream_options.include_usage)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from services.bench.prompt import BenchRequest, Reply
from services.bench.target_base import Outcome, StreamTimer, Target, TargetInfo

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def base_url(url: str) -> str:
    """http://host:port from http://host:port, http://host:port/ or http://host:port/v1."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class HttpTarget(Target):
    def __init__(self, url: str, endpoint: str, model: str | None, timeout_s: float) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; choose one of: {', '.join(ENDPOINTS)}")
        self.url = base_url(url)
        self.endpoint = endpoint
        self.model = model
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

    async def open(self) -> TargetInfo:
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(self.timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )
        try:
            reply = await self._client.get("/v1/models")
            reply.raise_for_status()
            models = reply.json().get("data") or []
        except (httpx.HTTPError, ValueError) as e:
            await self.close()
            raise ConnectionError(f"no OpenAI-compatible server at {self.url} (GET /v1/models: {e})") from e
        if self.model is None:
            if not models:
                await self.close()
                raise ConnectionError(f"{self.url}/v1/models lists no model; pass --model")
            self.model = str(models[0]["id"])
        listed: dict[str, Any] = next((m for m in models if m.get("id") == self.model), {})
        max_len = listed.get("max_model_len")
        return TargetInfo(self.model, None, int(max_len) if isinstance(max_len, int) else None, None)

    def _body(self, request: BenchRequest, temperature: float) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,  # vLLM's extension, so output lengths are exact
        }
        if self.endpoint == "chat":
            if request.messages is None:
                raise ValueError("a chat request needs text messages; give the benchmark a tokenizer")
            body["messages"] = request.messages
        elif request.token_ids is not None:
            body["prompt"] = request.token_ids
        elif request.text is not None:
            body["prompt"] = request.text
        else:
            raise ValueError("a completions request needs token ids or text")
        return body

    def _piece(self, choice: dict[str, Any]) -> str:
        if self.endpoint == "chat":
            return (choice.get("delta") or {}).get("content") or ""
        return choice.get("text") or ""

    async def generate(self, request: BenchRequest, temperature: float) -> Outcome:
        if self._client is None:
            raise RuntimeError("HttpTarget.generate before open()")
        body = self._body(request, temperature)
        timer = StreamTimer()
        text: list[str] = []
        usage: dict[str, Any] | None = None
        chunks = 0
        try:
            async with self._client.stream("POST", ENDPOINTS[self.endpoint], json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")
                    return timer.fail(f"HTTP {response.status_code}: {detail[:500]}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if event.get("error"):
                        return timer.fail(f"stream error: {json.dumps(event['error'])[:500]}")
                    for choice in event.get("choices") or []:
                        piece = self._piece(choice)
                        if piece:
                            timer.chunk()
                            chunks += 1
                            text.append(piece)
                    if event.get("usage"):
                        usage = event["usage"]
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            return timer.fail(f"{type(e).__name__}: {e}")
        prompt_tokens = int(usage.get("prompt_tokens") or 0) if usage else 0
        output_tokens = int(usage.get("completion_tokens") or 0) if usage else chunks
        return timer.succeed(prompt_tokens or request.expected_prompt_tokens, output_tokens, Reply("".join(text), None))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
