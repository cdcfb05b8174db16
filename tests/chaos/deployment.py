"""What a scenario strikes: a `pdserve serve` on this host, or a router of the netns test hosts' cluster.

Worker processes are found by the pid each worker reports in GetLoad, and signalled only when they belong
to the deployment this suite started: on one host, a process in the session of the `pdserve serve` it
launched (started with start_new_session, so Ray's raylet and workers inherit its session id); across
hosts, the process of that pid on the test host whose address is the worker's Ray node's (GetLoad's node_ip:
each host numbers its processes in a pid namespace of its own, so a pid alone names one on every host).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from services.proto_gen import generation_pb2 as pb

if TYPE_CHECKING:
    from tests.multihost.cluster import Cluster, Router
    from tests.service.conftest import RunningServer


class Deployment(ABC):
    """The addresses a scenario's clients use, how it signals a worker, and how it runs a command where its
    processes run."""

    grpc_target: str
    http_base: str
    topology: str
    host_ip: str  # the address of the host `python` runs on, as a worker there advertises it

    @abstractmethod
    def signal(self, worker: pb.WorkerLoad, sig: signal.Signals) -> None:
        """Sends `sig` to the worker's process."""

    @abstractmethod
    def python(self, code: str, *args: str) -> str:
        """Runs `python -c code args` on a host of the deployment; its standard output (RuntimeError if it fails)."""


class LocalDeployment(Deployment):
    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.grpc_target, self.http_base, self.topology = server.grpc_target, server.http_base, "one host"
        import ray

        self.host_ip = str(ray.util.get_node_ip_address())  # what Ray, and so each worker, takes as this node's

    def python(self, code: str, *args: str) -> str:
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"python -c failed: {done.stderr[-2000:]}")
        return done.stdout

    def signal(self, worker: pb.WorkerLoad, sig: signal.Signals) -> None:
        session = self.server.process.pid
        if os.getsid(worker.pid) != session:
            raise RuntimeError(f"pid {worker.pid} of {worker.worker} is not in session {session} of our server")
        os.kill(worker.pid, sig)


class ClusterDeployment(Deployment):
    def __init__(self, cluster: Cluster, router: Router) -> None:
        self.cluster, self.router = cluster, router
        self.grpc_target, self.http_base = router.grpc_target, router.http_base
        self.topology = f"{len(cluster.net.hosts)} hosts (netns)"
        self.host_ip = cluster.head.ip

    def python(self, code: str, *args: str) -> str:
        done = self.cluster.head.run([sys.executable, "-c", code, *args], self.cluster.env())
        if done.returncode != 0:
            raise RuntimeError(f"python -c on host {self.cluster.head.name} failed: {done.stderr[-2000:]}")
        return done.stdout

    def signal(self, worker: pb.WorkerLoad, sig: signal.Signals) -> None:
        hosts = [h for h in self.cluster.net.hosts.values() if h.ip == worker.node_ip]
        if len(hosts) != 1:
            raise RuntimeError(f"{worker.worker} runs on node {worker.node_ip!r}, which is no test host of ours")
        done = hosts[0].run(["kill", f"-{int(sig)}", str(worker.pid)], self.cluster.env())
        if done.returncode != 0:
            raise RuntimeError(f"kill on host {hosts[0].name}: {done.stderr}")
