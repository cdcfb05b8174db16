"""A server under test, chosen by URL: grpc:// for pdserve's gRPC API, http(s):// for any OpenAI-compatible server.

The contract both clients meet lives in the leaf module target_base, which the clients import.
"""

from __future__ import annotations

from urllib.parse import urlparse

from services.bench.target_base import Target, TargetInfo

__all__ = ["Target", "TargetInfo", "make_target"]  # services.bench.serve imports all three from here


def make_target(url: str, endpoint: str = "completions", model: str | None = None,
                timeout_s: float = 600.0) -> Target:
    """grpc://HOST:PORT selects pdserve's gRPC API; http(s)://HOST:PORT an OpenAI-compatible server."""
    parsed = urlparse(url)
    if parsed.scheme == "grpc":
        if not parsed.hostname or not parsed.port:
            raise ValueError(f"bad gRPC target {url!r}: expected grpc://HOST:PORT")
        if endpoint != "completions":
            raise ValueError("--endpoint chat needs an HTTP target; the gRPC API takes prompts only")
        from services.bench.grpc_target import GrpcTarget

        return GrpcTarget(f"{parsed.hostname}:{parsed.port}", timeout_s)
    if parsed.scheme in ("http", "https"):
        if not parsed.hostname:
            raise ValueError(f"bad HTTP target {url!r}: expected http://HOST:PORT")
        from services.bench.http_target import HttpTarget

        return HttpTarget(url, endpoint, model, timeout_s)
    raise ValueError(f"bad target {url!r}: expected grpc://HOST:PORT or http://HOST:PORT")
