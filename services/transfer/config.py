"""Configuration of the KV hand-off, and the one place that sets UCX's environment.

UCX reads its `UCX_*` variables when the data path's context is created, so `apply_ucx_env` must
run before that: `services.transfer.ucx_runtime` creates it, and calls `apply_ucx_env` first.

Where UCX listens: each of its tcp interfaces listens on its device's own address, one socket per
network device. When a worker is given the address it advertises, UCX_NET_DEVICES keeps those
sockets to the interface that holds it (plus the RDMA devices, which need no socket), unless the
environment already sets UCX_NET_DEVICES; the handshake's own listener binds to that address too
(receiver.py). Nothing listens on every interface.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from services.config_flags import flag

log = logging.getLogger(__name__)
FAILURE_POLICIES = ("recompute", "fail")
# Shared memory (posix/sysv), cross-memory attach (cma), loopback (self) and tcp. On one host the
# data path's endpoints (native/kvx.c, error handling off) carry headers and acks over sysv shared
# memory, the decode side maps the sender's staging ring, and tensors registered in place are
# read over cma (all seen with UCX_PROTO_INFO=y); between hosts without RDMA, everything goes over tcp.
DEFAULT_UCX_TLS = "posix,sysv,cma,self,tcp"
# Settings the data path was measured with (ucxx's defaults when it came up through ucxx): kept unless the
# environment sets them.
UCX_DEFAULTS = {
    "UCX_MEMTYPE_CACHE": "n",
    "UCX_RNDV_THRESH": "8192",
    "UCX_RNDV_FRAG_MEM_TYPE": "cuda",
    "UCX_MAX_RNDV_RAILS": "1",
}
SIOCGIFADDR = 0x8915
# Added where CUDA is available. Without cuda_copy, UCX takes a device pointer for host memory and
# every get into or out of CUDA memory fails with an I/O error (seen on an H200); on a host
# without CUDA, naming them only makes UCX warn in every process.
CUDA_UCX_TLS = "cuda_copy,cuda_ipc"


@dataclass(frozen=True)
class TransferConfig:
    """Settings shared by KVSender and KVReceiver, and what a decode worker and the router do when a hand-off fails.

    timeout_s is also the default for `KVReceiver.wait`.
    failure_policy: the transfer layer only carries it; the decode worker and the router act on it.
    host: the address the receiver listens on and advertises in `start()`, and that UCX's network listeners keep
        to (see above). Empty: a worker takes its node's address in the Ray cluster; a bare KVReceiver listens on
        127.0.0.1, and UCX on every device's address.
    ucx_tls: empty (the default): UCX_TLS from the environment if it is set there, as UCX users expect, else
        DEFAULT_UCX_TLS, plus CUDA_UCX_TLS where torch sees a CUDA device.
    staging_mib: shared memory allocated through UCX (see staging.py); CUDA tensors are always registered in place.
    spin_us: headers that find the loop polling need no wake-up: the sender's post takes about 2 us instead of
        12 here. The loop is busy for at most this long after each header.
    token_file: a file holding the cluster's KV token, read by each worker on its own host when its sender or
        receiver is made (so the secret never travels through Ray); empty: env PDSERVE_KV_TOKEN, else none
        (see handshake.py).
    """

    timeout_s: float = field(
        default=30.0, metadata=flag("limit on each KV network operation (connect, handshake, a header and payload), s")
    )
    failure_policy: str = field(
        default="recompute",
        metadata=flag("when a KV hand-off fails: recompute the prompt on the decode worker, or fail the request "
                      "(UNAVAILABLE)", choices=FAILURE_POLICIES),
    )
    host: str = field(
        default="",
        metadata=flag("the address a decode worker gives prefill workers to send it KV (default: its node's "
                      "address in the Ray cluster); workers listen for KV on it alone", name="--advertise-host"),
    )
    port: int = 0  # the receiver's listening port; 0 picks a free one
    ucx_tls: str = ""  # UCX transports (UCX_TLS)
    staging_mib: int = field(
        default=256,
        metadata=flag("each prefill worker's staging ring for host KV (shared memory); 0 registers tensors in place"),
    )
    spin_us: int = field(
        default=200,
        metadata=flag("how long a decode worker polls for a request's next KV layer before sleeping; 0 never polls"),
    )
    token_file: str = field(
        default="",
        metadata=flag("a file holding the shared KV token that every KV transfer must present; each worker reads "
                      "it on its own host (default: env PDSERVE_KV_TOKEN, else no token)", name="--kv-token-file"),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.timeout_s, int | float) or not self.timeout_s > 0:
            raise ValueError(f"TransferConfig.timeout_s must be > 0, got {self.timeout_s!r}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(
                f"TransferConfig.failure_policy must be one of {FAILURE_POLICIES}, got {self.failure_policy!r}"
            )
        try:
            if self.host:
                ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(f"TransferConfig.host must be an IP address or empty, got {self.host!r}") from None
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"TransferConfig.port must be in [0, 65535], got {self.port!r}")
        if self.ucx_tls:
            _check_tls(self.ucx_tls, "TransferConfig.ucx_tls")
        mib = self.staging_mib
        if not isinstance(mib, int) or isinstance(mib, bool) or not 0 <= mib <= 1 << 16:
            raise ValueError(f"TransferConfig.staging_mib must be an int in [0, 65536], got {mib!r}")
        spin = self.spin_us
        if not isinstance(spin, int) or isinstance(spin, bool) or not 0 <= spin <= 100_000:
            raise ValueError(f"TransferConfig.spin_us must be an int in [0, 100000], got {spin!r}")
        if not isinstance(self.token_file, str):
            raise ValueError(f"TransferConfig.token_file must be a path or empty, got {self.token_file!r}")

    def on_node(self) -> TransferConfig:
        """This config with its host, if it names none, set to the worker's address in the Ray cluster, which other
        hosts reach it at (127.0.0.1 outside Ray): where its KV listeners bind and what a decode worker advertises."""
        return self if self.host else dataclasses.replace(self, host=ray_node_ip() or "127.0.0.1")

    def transports(self) -> str:
        """The UCX_TLS in effect: `ucx_tls`, else the environment's UCX_TLS, else the defaults for this host."""
        if self.ucx_tls:
            return self.ucx_tls
        configured = os.environ.get("UCX_TLS", "")
        if configured:
            return _check_tls(configured, "UCX_TLS in the environment")
        import torch  # only now: the router never needs it

        return f"{DEFAULT_UCX_TLS},{CUDA_UCX_TLS}" if torch.cuda.is_available() else DEFAULT_UCX_TLS

    def ucx_env(self) -> dict[str, str]:
        """The UCX environment variables this configuration implies."""
        devices = os.environ.get("UCX_NET_DEVICES") or (net_devices(self.host) if self.host else "")
        return {
            **({"UCX_NET_DEVICES": devices} if devices else {}),
            "UCX_TLS": self.transports(),
            # Without shared memory or cma (another host, another pod), UCX emulates the gets over
            # tcp in segments of this size: 256k moved 8 and 64 MiB requests 1.5-2.5x faster than
            # the 8k default here.
            "UCX_TCP_TX_SEG_SIZE": "256k",
            "UCX_TCP_RX_SEG_SIZE": "256k",
            "UCX_WARN_UNUSED_ENV_VARS": "n",
        }

    def apply_ucx_env(self) -> dict[str, str]:
        """Write `ucx_env()`, and UCX_DEFAULTS not set already, into os.environ (before the data path comes up);
        returns what `ucx_env()` gave."""
        for name, value in UCX_DEFAULTS.items():
            os.environ.setdefault(name, value)
        env = self.ucx_env()
        os.environ.update(env)
        return env


def ray_node_ip() -> str:
    """This process's node address in the Ray cluster, which other hosts reach it at ("" outside Ray)."""
    import ray

    return str(ray.util.get_node_ip_address()) if ray.is_initialized() else ""


def _check_tls(tls: str, what: str) -> str:
    if not [t for t in tls.split(",") if t.strip()]:
        raise ValueError(f"{what} must name at least one UCX transport")
    return tls


def interface_of(address: str) -> str:
    """The network interface that holds `address` on this host, or "" when none does."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        try:
            lines = Path("/proc/net/if_inet6").read_text().splitlines()
        except OSError:
            return ""
        return next((f[5] for f in map(str.split, lines) if len(f) == 6 and f[0] == ip.exploded.replace(":", "")), "")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return ""


def net_devices(address: str) -> str:
    """UCX_NET_DEVICES for a worker that advertises `address`: its interface plus every RDMA port ("mlx5_0:1"),
    or "" (every device) when no interface here holds it."""
    interface = interface_of(address)
    if not interface:
        log.warning("no interface here holds the advertised address %s: UCX listens on every device's address",
                    address)
        return ""
    rdma = sorted(f"{port.parent.parent.name}:{port.name}" for port in Path("/sys/class/infiniband").glob("*/ports/*"))
    return ",".join([interface, *rdma])
