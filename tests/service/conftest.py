"""Starts real `pdserve serve` processes (real Ray, real UCX, real gRPC/HTTP on loopback) for service tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from services.bench.launch import REPO, LaunchedServer, launch
from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc

__all__ = ["REPO", "RunningServer", "start_server"]


class RunningServer(LaunchedServer):
    """A live `pdserve serve` with helpers for the tests."""

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return self.http_url

    def stub(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(grpc.insecure_channel(self.grpc_target))

    def log(self) -> str:
        return self.log_tail(10**7)

    def wait_http_ready(self, timeout: float = 180) -> RunningServer:
        """Waits until HTTP /health says ready (the workers are up) and returns the server."""
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.http_base}/health", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"/health never became 200:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def load(self, check_integrity: bool = True) -> pb.LoadReport:
        return self.stub().GetLoad(pb.LoadRequest(check_integrity=check_integrity), timeout=30)


def start_server(tmp_dir: Path, model_dir: str, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 180) -> RunningServer:
    server = launch(tmp_dir, "--model", model_dir, *args, env=env, timeout=timeout)
    return RunningServer(server.process, server.grpc_port, server.http_port, server.log_path)


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny preset, generated once for the service tests."""
    from services.modelgen.build import make_model

    return str(make_model(tmp_path_factory.mktemp("serve-model") / "tiny", preset="tiny", seed=0))


@pytest.fixture(scope="session")
def disagg_server(tmp_path_factory: pytest.TempPathFactory, serve_model_dir: str) -> Iterator[RunningServer]:
    """One prefill and one decode worker, shared by the tests that don't need their own server."""
    server = start_server(tmp_path_factory.mktemp("disagg"), serve_model_dir, "--mode", "disagg",
                          "--local-prefill-threshold", "0")
    yield server
    server.stop()
