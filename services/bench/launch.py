"""Starts `pdserve serve` as a subprocess on free loopback ports and waits until gRPC health says SERVING."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[2]


# Ports are drawn from here: below Linux's ephemeral range (32768-60999), from which every bind to port 0 takes
# one (a server's own Ray processes among them, between this check and the server's bind: a test once found a
# Ray gRPC server on its server's port), and above Ray's worker ports (10002-19999).
FREE_PORTS = range(20000, 32768)


def free_port() -> int:
    """A loopback port nothing listens on now, outside the range that binds to port 0 draw from."""
    for _ in range(200):
        port = random.choice(FREE_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server process started in a session of its own, with its output in `log_path`: stop() sends SIGTERM
    and kills its process group if it lingers. Subclasses are dataclasses with these two fields."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 5000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LaunchedServer(ServerProcess):
    """A running `pdserve serve`; stop() sends SIGTERM (drain) and kills it if it lingers."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def _serving(grpc_port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def launch(log_dir: Path, *serve_args: str, timeout: float = 240.0,
           env: dict[str, str] | None = None) -> LaunchedServer:
    """`pdserve serve --grpc-port P --http-port Q *serve_args`, logging to log_dir; raises if it never serves."""
    log_dir.mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = free_port(), free_port()
    log_path = log_dir / f"serve-{grpc_port}.log"
    cmd = [sys.executable, "-m", "services.cli", "serve", "--grpc-port", str(grpc_port),
           "--http-port", str(http_port), *serve_args]
    proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0", **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=proc_env,
                                   start_new_session=True)
    server = LaunchedServer(process, grpc_port, http_port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with {process.returncode}:\n{server.log_tail()}")
        if _serving(grpc_port):
            return server
        time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"pdserve serve did not become SERVING in {timeout:.0f}s:\n{server.log_tail()}")
