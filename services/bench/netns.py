"""Hosts on one machine, for benchmarks and tests: each is its own network, UTS, mount, IPC and PID namespace.

    root namespace: bridge pdsbr-XXXX 10.231.N.254/24 (the test process talks to the hosts through it)
        ├── veth ── host "a" 10.231.N.1   hostname a, its own /tmp and /dev/shm
        ├── veth ── host "b" 10.231.N.2
        └── veth ── host "c" 10.231.N.3

Only the network joins them, as between real machines: a host's SysV segments, /dev/shm and
process ids are its own, so UCX cannot reach another host through shared memory or cma; and its
/sys is its own network namespace's, so UCX lists the host's own interfaces. A host
is a holder process (`sleep`) that owns the namespaces; commands enter them with nsenter.
Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); `unavailable()` says why it cannot run here.

`RayHosts` puts a Ray cluster on such hosts, token authentication on: the head on "a" (no CPUs: it is
for drivers, as a deployment's router), and one node per worker host that advertises a resource
("prefill" on b, "decode" on c), as a deployment's worker groups do. tests/multihost/cluster.py starts
the Helm chart's own pod commands instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("ip", "unshare", "nsenter")


def unavailable() -> str:
    """Why test hosts cannot be made here, or "" when they can."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"test hosts need {', '.join(missing)} on PATH"
    if os.geteuid() != 0:
        return "test hosts need root (network, UTS, mount, IPC and PID namespaces, veth pairs and a bridge)"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "--ipc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"namespaces are not permitted here: {probe.stderr.strip()}"
    return ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Host:
    name: str
    ip: str
    holder: subprocess.Popen[bytes]
    pid: int  # the namespaces' first process, as the root namespace numbers it
    veth: str  # the host's end of its veth pair (inside the host)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` as it runs inside this host."""
        return ["nsenter", "-t", str(self.pid), "--net", "--uts", "--mount", "--ipc", "--pid", "--", *argv]

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv), env=env, capture_output=True, text=True, timeout=timeout)

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Starts a long-running process here, its output going to `log`; `close()` stops it."""
        with log.open("ab") as out:
            proc = subprocess.Popen(self.command(argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.processes.append(proc)
        return proc

    def set_link(self, up: bool) -> None:
        """Cut this host off the network (or plug it back in)."""
        subprocess.run(self.command(["ip", "link", "set", self.veth, "up" if up else "down"]), check=True)


class TestNetwork:
    """A bridge and the hosts on it; `close()` removes every process, namespace and link it made."""

    def __init__(self, subnet: int = 231) -> None:
        self.tag = os.urandom(2).hex()
        self.bridge = f"pdsbr-{self.tag}"
        self.prefix = f"10.{subnet}.{int(self.tag[:2], 16) % 250}"
        self.hosts: dict[str, Host] = {}
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.prefix}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.254"

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        ip = f"{self.prefix}.{index}"
        inside, outside = f"pd{self.tag}{index}", f"pd{self.tag}{index}h"
        script = (
            f"hostname {name} && mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /dev/shm "
            f"&& mount -t proc proc /proc && mount -t sysfs sysfs /sys && exec sleep 86400"
        )
        holder = subprocess.Popen(
            ["unshare", "--net", "--uts", "--mount", "--ipc", "--pid", "--fork", "--propagation", "private",
             "sh", "-c", script],
            start_new_session=True,
        )
        pid = _first_child(holder.pid)
        _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("link", "set", inside, "netns", str(pid))
        host = Host(name, ip, holder, pid, inside)
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{ip}/24", "dev", inside],
                     ["ip", "link", "set", inside, "up"], ["ip", "route", "add", "default", "via", self.gateway]):
            subprocess.run(host.command(argv), check=True, capture_output=True)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            for proc in host.processes:
                _kill_group(proc)
            _kill_group(host.holder)
        for host in self.hosts.values():
            _ip("link", "del", f"{host.veth}h", check=False)
        _ip("link", "del", self.bridge, check=False)
        self.hosts.clear()


def _first_child(pid: int, timeout_s: float = 10.0) -> int:
    """The child that `unshare --fork` starts in the new namespaces."""
    deadline = time.monotonic() + timeout_s
    children = Path(f"/proc/{pid}/task/{pid}/children")
    while time.monotonic() < deadline:
        found = children.read_text().split() if children.exists() else []
        if found:
            child = int(found[0])
            # Wait until it has mounted its own /tmp: then it is inside the namespaces for good.
            if Path(f"/proc/{child}/comm").read_text().strip() == "sleep":
                return child
        time.sleep(0.02)
    raise RuntimeError(f"the namespace holder {pid} did not start")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


RAY_PORT = 6379


class RayHosts:
    """A TestNetwork with a Ray cluster on it (see the module docstring); `close()` takes all of it down.

    `nodes` maps each worker host's name to the resource its node advertises, e.g. {"b": "prefill"}.
    Every host sees the same files but /tmp and /dev/shm: the token and the logs go to `shared`.
    """

    def __init__(self, nodes: dict[str, str], cpus_per_node: int = 1) -> None:
        self.net = TestNetwork()
        self.shared = Path(f"/var/tmp/pdserve-hosts-{self.net.tag}")
        try:
            self.shared.mkdir(parents=True)
            self.token.write_text(os.urandom(24).hex())
            self.token.chmod(0o400)
            head = self.net.add_host("a")
            self.start(head, ["ray", "start", "--head", "--block", f"--port={RAY_PORT}", "--num-cpus=0",
                              "--include-dashboard=false"], "ray")
            wait_for_port(head.ip, RAY_PORT)
            for name, resource in nodes.items():
                host = self.net.add_host(name)
                self.start(host, ["ray", "start", f"--address={self.address}", "--block",
                                  f"--num-cpus={cpus_per_node}", f"--resources={{\"{resource}\": 1}}"], "ray")
        except BaseException:
            self.close()
            raise

    @property
    def head(self) -> Host:
        return self.net.hosts["a"]

    @property
    def address(self) -> str:
        """The head's GCS, as drivers and nodes join it."""
        return f"{self.head.ip}:{RAY_PORT}"

    @property
    def token(self) -> Path:
        return self.shared / "ray-token"

    def env(self) -> dict[str, str]:
        """What a process on a host needs for `ray`, `pdserve` and `python -m services...`, token included."""
        return host_env(self.token)

    def start(self, host: Host, argv: list[str], what: str) -> subprocess.Popen[bytes]:
        """A long-running process on `host`, logging to shared/WHAT-HOST.log."""
        return host.start(argv, self.env(), self.shared / f"{what}-{host.name}.log")

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in self.shared.glob("*.log"))

    def close(self) -> None:
        self.net.close()
        shutil.rmtree(self.shared, ignore_errors=True)

    def __enter__(self) -> RayHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_port(address: str, port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def host_env(token: Path) -> dict[str, str]:
    """What a process on a test host needs for `ray`, `pdserve` and `python -m services...`, with Ray's token."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": "/tmp",
        "PYTHONUNBUFFERED": "1",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
