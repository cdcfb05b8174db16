"""Starts real `pdserve serve` processes (real Ray, real UCX, real gRPC/HTTP on loopback) for service tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    log_path: Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stub(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(grpc.insecure_channel(self.grpc_target))

    def aio_stub(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(grpc.aio.insecure_channel(self.grpc_target))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def load(self, check_integrity: bool = True) -> pb.LoadReport:
        return self.stub().GetLoad(pb.LoadRequest(check_integrity=check_integrity), timeout=30)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(tmp_dir: Path, model_dir: str, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 180) -> RunningServer:
    grpc_port, http_port = free_port(), free_port()
    log_path = tmp_dir / f"serve-{grpc_port}.log"
    cmd = [sys.executable, "-m", "services.cli", "serve", "--model", model_dir,
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), *args]
    proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0", **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=proc_env,
                                   start_new_session=True)
    server = RunningServer(process, grpc_port, http_port, log_path)
    channel = grpc.insecure_channel(server.grpc_target)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with {process.returncode}:\n{server.log()[-5000:]}")
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return server
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"pdserve serve did not become SERVING in {timeout}s:\n{server.log()[-5000:]}")


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny preset, generated once for the service tests."""
    from services.engine.make_model import make_model

    return str(make_model(tmp_path_factory.mktemp("serve-model") / "tiny", preset="tiny", seed=0))


@pytest.fixture(scope="session")
def disagg_server(tmp_path_factory: pytest.TempPathFactory, serve_model_dir: str) -> Iterator[RunningServer]:
    """One prefill and one decode worker, shared by the tests that don't need their own server."""
    server = start_server(tmp_path_factory.mktemp("disagg"), serve_model_dir, "--mode", "disagg",
                          "--local-prefill-threshold", "0")
    yield server
    server.stop()
