"""Runs UCX's own `ucx_perftest` (shipped in the libucx wheel) as the bandwidth reference.

On one host, `run_perftest` starts both ends on 127.0.0.1. Across hosts, `PerftestEnd` is a Ray actor
body that runs one end on its node, and `run_perftest_between` pairs a server actor with a client actor.
Each run sees UCX as shipped: the environment's UCX_* variables are left out (a process that set up
the KV hand-off has its own in os.environ), and only UCX_TLS is set, plus whatever `env` adds (such as
the hand-off's own UCX_TCP_* settings, for a reference tuned alike).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from services.transfer.libucx import libucx_dir

MIB = 1 << 20


@dataclass(frozen=True)
class PerftestResult:
    test: str
    tls: str
    size: int
    gbps: float  # 1e9 bytes per second


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _parse_overall_mbps(output: str) -> float:
    """The 'overall' bandwidth column (MB/s, MB = 2**20) of `ucx_perftest -f` output's last data row."""
    rows = [line.split() for line in output.splitlines() if line.strip() and line.split()[0].isdigit()]
    if not rows or len(rows[-1]) < 6:
        raise RuntimeError(f"cannot parse ucx_perftest output:\n{output}")
    return float(rows[-1][5])


def _argv(size: int, test: str, port: int) -> list[str]:
    """Either end's command line (the client adds the server's address after the program)."""
    exe = libucx_dir() / "bin" / "ucx_perftest"
    if not exe.exists():
        raise FileNotFoundError(f"{exe} not found (is the libucx wheel installed?)")
    iters = max(16, min(500, (512 * MIB) // size))
    return [str(exe), "-t", test, "-s", str(size), "-n", str(iters), "-w", "4", "-p", str(port), "-f"]


def _env(tls: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    plain = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
    ucx = {"UCX_TLS": tls, "UCX_WARN_UNUSED_ENV_VARS": "n", **(extra or {})}
    return {**plain, "LD_LIBRARY_PATH": str(libucx_dir() / "lib"), **ucx}


def _stop(server: subprocess.Popen[bytes]) -> None:
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _client(
    server_host: str, argv: list[str], env: dict[str, str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([argv[0], server_host, *argv[1:]], env=env, capture_output=True, text=True, timeout=timeout_s)


def _result(test: str, tls: str, size: int, client: subprocess.CompletedProcess[str]) -> PerftestResult:
    if client.returncode != 0:
        raise RuntimeError(f"ucx_perftest {test} UCX_TLS={tls} -s {size} failed:\n{client.stdout}\n{client.stderr}")
    return PerftestResult(test, tls, size, _parse_overall_mbps(client.stdout) * MIB / 1e9)


def run_perftest(
    size: int, tls: str, test: str = "tag_bw", timeout_s: float = 60.0, env: dict[str, str] | None = None
) -> PerftestResult:
    """One server+client pair of `ucx_perftest` on 127.0.0.1 moving `size`-byte messages."""
    for attempt in range(3):
        argv = _argv(size, test, _free_port())
        server = subprocess.Popen(argv, env=_env(tls, env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3 + 0.3 * attempt)
            client = _client("127.0.0.1", argv, _env(tls, env), timeout_s)
        finally:
            _stop(server)
        if client.returncode == 0 or attempt == 2:
            return _result(test, tls, size, client)
    raise AssertionError("unreachable")


class PerftestEnd:
    """One end of `ucx_perftest` on a Ray node (wrap with `ray.remote`); see `run_perftest_between`."""

    def __init__(self) -> None:
        self._server: subprocess.Popen[bytes] | None = None

    def address(self) -> str:
        import ray

        return str(ray.util.get_node_ip_address())

    def serve(self, size: int, tls: str, test: str, env: dict[str, str]) -> int:
        """Start the server end; returns its port."""
        argv = _argv(size, test, _free_port("0.0.0.0"))
        self._server = subprocess.Popen(
            argv, env=_env(tls, env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return int(argv[argv.index("-p") + 1])

    def stop(self) -> None:
        if self._server is not None:
            _stop(self._server)
            self._server = None

    def connect(
        self, host: str, port: int, size: int, tls: str, test: str, env: dict[str, str], timeout_s: float
    ) -> tuple[int, str]:
        """Run the client end against the server at host:port; (its exit status, its output)."""
        client = _client(host, _argv(size, test, port), _env(tls, env), timeout_s)
        return client.returncode, f"{client.stdout}\n{client.stderr}"


def run_perftest_between(
    server: Any, client: Any, size: int, tls: str, test: str, env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> PerftestResult:
    """`ucx_perftest` with its server end on one actor's node and its client on another's (PerftestEnd actors)."""
    import ray

    host = ray.get(server.address.remote())
    for attempt in range(3):
        port = ray.get(server.serve.remote(size, tls, test, env or {}))
        try:
            time.sleep(0.5 + 0.5 * attempt)
            status, output = ray.get(client.connect.remote(host, port, size, tls, test, env or {}, timeout_s))
        finally:
            ray.get(server.stop.remote())
        if status == 0 or attempt == 2:
            return _result(test, tls, size, subprocess.CompletedProcess([], status, output, ""))
    raise AssertionError("unreachable")
