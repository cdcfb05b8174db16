"""A pdserve deployment across test hosts (netns.py), started with the commands the Helm chart's pods run.

    host a: the Ray head pod's container, and a router container (a driver on the head's raylet)
    host b: a prefill worker pod (a Ray node advertising {"prefill": 1})
    host c: a decode worker pod (a Ray node advertising {"decode": 1})
    host d: a router pod: its Ray container (a node advertising {"router": 1}) and its router container
and, added with Cluster.add_node, more worker pods (the chaos soak adds a decode pod on e and a prefill pod on f).
Each host runs the argv and environment that tests/deploy/pod_commands.py reads from the rendered chart,
so the harness and the chart cannot drift apart. What Kubernetes would fill in, the harness does: the head
service's address becomes host a's, and each Secret's mount path (the Ray token, the KV token the routers pass
as --kv-token-file) a file every host reads.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.bench.netns import Host, TestNetwork, host_env, wait_for_port
from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc
from tests.deploy.pod_commands import ContainerCommand, pod_commands

RAY_PORT = 6379
GRPC_PORT = 50051
HTTP_PORT = 8000


@dataclass
class Router:
    host: Host
    process: subprocess.Popen[bytes]
    log: Path
    ca: Path | None = None  # the CA of its certificate, when it serves TLS

    @property
    def grpc_target(self) -> str:
        return f"{self.host.ip}:{GRPC_PORT}"

    @property
    def http_base(self) -> str:
        return f"{'https' if self.ca else 'http'}://{self.host.ip}:{HTTP_PORT}"

    def channel(self) -> grpc.Channel:
        if self.ca is None:
            return grpc.insecure_channel(self.grpc_target)
        return grpc.secure_channel(self.grpc_target, grpc.ssl_channel_credentials(self.ca.read_bytes()))

    def serving(self) -> bool:
        with self.channel() as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def workers(self) -> list[pb.WorkerLoad]:
        with self.channel() as channel:
            return list(pb_grpc.GenerationStub(channel).GetLoad(pb.LoadRequest(), timeout=30).workers)

    def terminate(self) -> None:
        """SIGTERM to the router process, as Kubernetes stops its container. `process` is the nsenter that
        started it inside its host, which does not pass signals on: the signal goes to nsenter's child."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGTERM)


def chart_values(model: Path, serve_args: list[str]) -> dict[str, Any]:
    """The chart's values for the test hosts: one core per worker pod, the model at a path every host sees."""
    one_core = {"resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}}
    return {
        "model": {"source": "image", "image": {"path": str(model)}},
        "workers": {"prefill": one_core, "decode": one_core},
        "router": {"extraArgs": serve_args},
    }


@dataclass
class Cluster:
    net: TestNetwork
    shared: Path  # seen by every host at the same path (the model, the token, the logs)
    values: dict[str, Any]  # the chart's values
    commands: dict[str, ContainerCommand]  # by role, as the chart renders them
    routers: list[Router] = field(default_factory=list)
    secrets: dict[str, Path] = field(default_factory=dict)  # "NAME/KEY" of a user's Secret -> the file it holds

    @property
    def head(self) -> Host:
        return self.net.hosts["a"]

    @property
    def token(self) -> Path:
        return self.shared / "ray-token"

    @property
    def kv_token(self) -> Path:
        return self.shared / "kv-token"

    def secret_file(self, source: str) -> Path:
        """The shared file standing for a Secret's key ({secret:NAME/KEY}) mounted in a pod."""
        named = self.secrets.get(source.removeprefix("{secret:").removesuffix("}"))
        if named is not None:
            return named
        return self.kv_token if "-kv-token/" in source else self.token

    def env(self) -> dict[str, str]:
        """What a shell on a test host needs for `ray` and `pdserve`, with the token of this cluster."""
        return host_env(self.token)

    def run_container(self, host: Host, role: str, command: ContainerCommand | None = None) -> subprocess.Popen[bytes]:
        """Starts the container of `role` on `host`, as its pod would (`command`: another rendering's)."""
        command = (command or self.commands[role]).fill({"head": self.head.ip})
        env, argv = dict(command.env), list(command.argv)
        for mount, source in command.files.items():  # each Secret's mount: its shared token file
            env = {k: v.replace(mount, str(self.secret_file(source))) for k, v in env.items()}
            argv = [a.replace(mount, str(self.secret_file(source))) for a in argv]
        env = {**env, **{k: v for k, v in self.env().items() if k not in env or k == "PATH"}}
        unfilled = {k for k, v in env.items() if "{" in v}
        for name in unfilled:  # pod metadata the Downward API gives; nothing here reads it
            env[name] = host.name
        return host.start(argv, env, self.shared / f"{role}-{host.name}.log")

    def add_node(self, name: str, role: str) -> Host:
        """A new host running the Ray container of a worker pod of `role` ("prefill" or "decode")."""
        host = self.net.add_host(name)
        self.run_container(host, role)
        return host

    def start_router(self, host: Host) -> Router:
        log = self.shared / f"router-{host.name}.log"
        router = Router(host, self.run_container(host, "router"), log)
        self.routers.append(router)
        return router

    def start_secured_router(self, host: Host, api_keys: list[str], pki: Path) -> Router:
        """The router container of a router pod on `host` (added with add_node(name, "router-ray")), rendered with
        the chart's API keys and TLS values: Secrets of the keys and of pki's tls.crt/tls.key, whose certificate
        names the host (tests/pki.py). It is not one of `routers`."""
        (self.shared / "api-keys").write_text("\n".join(api_keys) + "\n")
        self.secrets.update({"api-keys/api-keys": self.shared / "api-keys", "router-tls/tls.crt": pki / "tls.crt",
                             "router-tls/tls.key": pki / "tls.key"})
        values = {**self.values, "auth": {"apiKeys": {"existingSecret": "api-keys"}},
                  "tls": {"existingSecret": "router-tls"}}
        command = pod_commands(values)["router"]
        log = self.shared / f"router-{host.name}.log"
        return Router(host, self.run_container(host, "router", command), log, ca=pki / "ca.crt")

    def wait_serving(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        for router in self.routers:
            while not router.serving():
                if router.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"router on {router.host.name} is not serving:\n{self.logs()}")
                time.sleep(0.5)

    def wait_workers(self, prefill: int, decode: int, timeout_s: float = 120) -> None:
        """Until every router's pools hold `prefill` prefill and `decode` decode workers, all alive."""
        deadline = time.monotonic() + timeout_s
        for router in self.routers:
            while True:
                alive = [w.role for w in router.workers() if w.alive]
                if (alive.count("prefill"), alive.count("decode")) == (prefill, decode):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"router on {router.host.name} has workers {alive}:\n{self.logs()}")
                time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.shared.glob("*.log"))


def start_cluster(model_source: Path, serve_args: list[str]) -> Cluster:
    """Hosts a-d with the chart's containers on them; returns once both routers serve."""
    net = TestNetwork()
    shared = Path(f"/var/tmp/pdserve-hosts-{net.tag}")
    try:
        shared.mkdir(parents=True)
        model = shared / "model"
        shutil.copytree(model_source, model)
        values = chart_values(model, serve_args)
        cluster = Cluster(net, shared, values, pod_commands(values))
        for token in (cluster.token, cluster.kv_token):
            token.write_text(os.urandom(24).hex())
            token.chmod(0o400)
        head = net.add_host("a")
        cluster.run_container(head, "head")
        wait_for_port(head.ip, RAY_PORT)
        cluster.add_node("b", "prefill")
        cluster.add_node("c", "decode")
        router_host = cluster.add_node("d", "router-ray")
        cluster.start_router(head)
        cluster.start_router(router_host)
        cluster.wait_serving()
        return cluster
    except BaseException:
        net.close()
        shutil.rmtree(shared, ignore_errors=True)
        raise


def stop_cluster(cluster: Cluster) -> None:
    for router in cluster.routers:
        if router.process.poll() is None:
            router.process.terminate()
    for router in cluster.routers:
        try:
            router.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
    cluster.net.close()
    shutil.rmtree(cluster.shared, ignore_errors=True)
