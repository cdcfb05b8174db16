"""A pdserve deployment across test hosts (netns.py): the Ray head, worker groups and routers.

    host a: Ray head (no actors) and router 1, a driver on the head's raylet
    host b: a Ray node advertising {"prefill": 1}
    host c: a Ray node advertising {"decode": 1}
    host d: a Ray node advertising {"router": 1} (no CPUs for actors) and router 2 on it
Every process runs with Ray token authentication on; the token is a file that every host reads,
as a Secret mounted in every pod. The routers run `pdserve serve --ray-address HEAD:6379
--worker-group-resources`, so the pools follow the nodes: one worker per unit of a group's resource.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.multihost.netns import Host, TestNetwork

REPO = Path(__file__).resolve().parents[2]
RAY_PORT = 6379
GRPC_PORT = 50051
HTTP_PORT = 8000


@dataclass
class Router:
    host: Host
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def grpc_target(self) -> str:
        return f"{self.host.ip}:{GRPC_PORT}"

    @property
    def http_base(self) -> str:
        return f"http://{self.host.ip}:{HTTP_PORT}"

    def serving(self) -> bool:
        with grpc.insecure_channel(self.grpc_target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Cluster:
    net: TestNetwork
    shared: Path  # seen by every host at the same path (the model, the token, the logs)
    model: Path
    serve_args: list[str]
    routers: list[Router] = field(default_factory=list)

    @property
    def head(self) -> Host:
        return self.net.hosts["a"]

    @property
    def head_address(self) -> str:
        return f"{self.head.ip}:{RAY_PORT}"

    def env(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        return {
            "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": "/tmp",
            "PYTHONUNBUFFERED": "1",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.shared / "ray-token"),
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def ray_start(self, host: Host, *params: str) -> None:
        argv = ["ray", "start", f"--node-ip-address={host.ip}", "--disable-usage-stats", *params]
        result = host.run(argv, self.env(), timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"ray start on host {host.name} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")

    def add_node(self, name: str, resources: str, num_cpus: int) -> Host:
        host = self.net.add_host(name)
        self.ray_start(host, f"--address={self.head_address}", f"--num-cpus={num_cpus}", f"--resources={resources}")
        return host

    def start_router(self, host: Host) -> Router:
        log = self.shared / f"router-{host.name}.log"
        argv = ["pdserve", "serve", "--model", str(self.model), "--ray-address", self.head_address,
                "--worker-group-resources", "--host", "0.0.0.0", "--grpc-port", str(GRPC_PORT),
                "--http-port", str(HTTP_PORT), *self.serve_args]
        router = Router(host, host.start(argv, self.env(), log), log)
        self.routers.append(router)
        return router

    def wait_serving(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        for router in self.routers:
            while not router.serving():
                if router.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"router on {router.host.name} is not serving:\n"
                                       f"{router.log.read_text(errors='replace')[-4000:]}")
                time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.shared.glob("*.log"))


def start_cluster(model_source: Path, serve_args: list[str], second_router: bool = True) -> Cluster:
    """Hosts a-c (and d), Ray on each with token auth, and the routers; returns once every router serves."""
    net = TestNetwork()
    shared = Path(f"/var/tmp/pdserve-hosts-{net.tag}")
    try:
        shared.mkdir(parents=True)
        token = shared / "ray-token"
        token.write_text(os.urandom(24).hex())
        token.chmod(0o400)
        model = shared / "model"
        shutil.copytree(model_source, model)
        cluster = Cluster(net, shared, model, serve_args)
        head = net.add_host("a")
        cluster.ray_start(head, "--head", f"--port={RAY_PORT}", "--num-cpus=0", "--include-dashboard=false")
        cluster.add_node("b", '{"prefill": 1}', 1)
        cluster.add_node("c", '{"decode": 1}', 1)
        cluster.start_router(head)
        if second_router:
            cluster.start_router(cluster.add_node("d", '{"router": 1}', 0))
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
