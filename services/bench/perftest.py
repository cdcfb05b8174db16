"""Runs UCX's own `ucx_perftest` (shipped in the libucx wheel) as the bandwidth reference."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass

from services.transfer.libucx import libucx_dir

MIB = 1 << 20


@dataclass(frozen=True)
class PerftestResult:
    test: str
    tls: str
    size: int
    gbps: float  # 1e9 bytes per second


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parse_overall_mbps(output: str) -> float:
    """The 'overall' bandwidth column (MB/s, MB = 2**20) of `ucx_perftest -f` output's last data row."""
    rows = [line.split() for line in output.splitlines() if line.strip() and line.split()[0].isdigit()]
    if not rows or len(rows[-1]) < 6:
        raise RuntimeError(f"cannot parse ucx_perftest output:\n{output}")
    return float(rows[-1][5])


def run_perftest(size: int, tls: str, test: str = "tag_bw", timeout_s: float = 60.0) -> PerftestResult:
    """One server+client pair of `ucx_perftest` on 127.0.0.1 moving `size`-byte messages."""
    root = libucx_dir()
    exe = root / "bin" / "ucx_perftest"
    if not exe.exists():
        raise FileNotFoundError(f"{exe} not found (is the libucx wheel installed?)")
    iters = max(16, min(500, (512 * MIB) // size))
    env = {**os.environ, "LD_LIBRARY_PATH": str(root / "lib"), "UCX_TLS": tls, "UCX_WARN_UNUSED_ENV_VARS": "n"}
    for attempt in range(3):
        port = _free_port()
        args = [str(exe), "-t", test, "-s", str(size), "-n", str(iters), "-w", "4", "-p", str(port), "-f"]
        server = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3 + 0.3 * attempt)
            client = subprocess.run(
                [*args[:1], "127.0.0.1", *args[1:]], env=env, capture_output=True, text=True, timeout=timeout_s
            )
        finally:
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if client.returncode == 0:
            mbps = _parse_overall_mbps(client.stdout)
            return PerftestResult(test, tls, size, mbps * MIB / 1e9)
    raise RuntimeError(f"ucx_perftest {test} UCX_TLS={tls} -s {size} failed:\n{client.stdout}\n{client.stderr}")
