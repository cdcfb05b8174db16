"""pdserve across test hosts (netns.py, cluster.py): Ray head and router on a, prefill on b, decode on c, router on d.

Every host runs the Helm chart's pod commands; token authentication is on everywhere. Last, a third router pod on
host g runs with the chart's API keys and TLS. Every prefill goes
to the prefill worker on b, so every request's KV crosses the network from b to c. Answers are checked
against transformers.
"""

from __future__ import annotations

import re
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import torch

from services.bench.netns import unavailable
from services.bench.offline import hf_generate, load_transformers
from services.engine.tokenizer import Tokenizer
from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc
from tests.multihost.cluster import Cluster, Router, start_cluster, stop_cluster
from tests.pki import make_pki

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "test hosts can be made")

NUM_OUT = 8
PROMPTS = [[(7 * i + 11 * j) % 900 + 5 for j in range(n)] for i, n in enumerate((40, 97, 150))]


@pytest.fixture(scope="module")
def expected(make_test_model: Callable[..., Path]) -> list[list[int]]:
    model = make_test_model()
    return hf_generate(load_transformers(str(model), "cpu", torch.float32), PROMPTS, NUM_OUT)


@pytest.fixture(scope="module")
def cluster(make_test_model: Callable[..., Path]) -> Iterator[Cluster]:
    deployment = start_cluster(make_test_model(), ["--local-prefill-threshold", "0", "--transfer-failure-policy",
                                                   "fail"])
    try:
        yield deployment
    finally:
        stop_cluster(deployment)


def _stub(router: Router) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(grpc.insecure_channel(router.grpc_target))


def _grpc_tokens(router: Router, prompt: list[int]) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingParams(temperature=0, max_tokens=NUM_OUT, ignore_eos=True))
    replies = list(_stub(router).Generate(request, timeout=60))
    assert replies[-1].HasField("complete") and replies[-1].complete.finish_reason == "length"
    return [t for r in replies if r.HasField("chunk") for t in r.chunk.token_ids]


def _metric(router: Router, name: str, **labels: str) -> float:
    """The sum of a series' samples on the router's /metrics whose labels include `labels`."""
    text = httpx.get(f"{router.http_base}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _decode_workers(router: Router) -> list[pb.WorkerLoad]:
    load = _stub(router).GetLoad(pb.LoadRequest(check_integrity=True), timeout=30)
    return [w for w in load.workers if w.role == "decode"]


def test_every_router_gives_transformers_answers(cluster: Cluster, expected: list[list[int]],
                                                 make_test_model: Callable[..., Path]) -> None:
    tokenizer = Tokenizer(str(make_test_model()))
    assert len(cluster.routers) == 2
    for router in cluster.routers:
        client = openai.OpenAI(base_url=f"{router.http_base}/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        for prompt, want in zip(PROMPTS, expected, strict=True):
            assert _grpc_tokens(router, prompt) == want, f"gRPC via {router.host.name}: {len(prompt)} tokens"
            out = client.completions.create(model=model, prompt=prompt, temperature=0.0, max_tokens=NUM_OUT,
                                            extra_body={"ignore_eos": True})
            assert out.choices[0].text == tokenizer.decode(want), f"HTTP via {router.host.name}"


def test_the_routers_share_one_pair_of_workers(cluster: Cluster) -> None:
    names = [sorted(w.worker for w in _stub(r).GetLoad(pb.LoadRequest(), timeout=30).workers) for r in cluster.routers]
    assert names[0] == names[1] and len(names[0]) == 2, names


def test_the_kv_crossed_the_network(cluster: Cluster, expected: list[list[int]]) -> None:
    router = cluster.routers[0]
    before = _metric(router, "pdserve_kv_transfer_bytes_sum", transport="tcp")
    assert _grpc_tokens(router, PROMPTS[2]) == expected[2]
    assert _metric(router, "pdserve_kv_transfer_bytes_sum", transport="tcp") > before
    assert _metric(router, "pdserve_kv_transfer_bytes_count", transport="shm") == 0
    assert _metric(router, "pdserve_kv_transfer_failures_total") == 0
    for worker in _decode_workers(router):
        assert worker.alive and not worker.integrity_error
    # The decode worker says once per connection what its reads go over (services/transfer/recv_links.py).
    grep = "grep -h 'reads over' /tmp/ray/session_latest/logs/worker*"
    said = cluster.net.hosts["c"].run(["sh", "-c", grep], cluster.env()).stdout.splitlines()
    prefill = cluster.net.hosts["b"].ip
    assert said and all(re.search(rf"from {re.escape(prefill)}:\d+: reads over tcp \(device ", s) for s in said), said


# Ray's core worker serves its own gRPC on a port of Ray's worker-port range, on every interface.
_RAY_WORKER_PORTS = range(10002, 20000)


def test_the_workers_listen_on_their_own_address_alone(cluster: Cluster) -> None:
    """The KV handshake's listener and UCX's own tcp listeners bind to the worker's host address, no other."""
    load = _stub(cluster.routers[0]).GetLoad(pb.LoadRequest(), timeout=30)
    for worker in load.workers:
        host = cluster.net.hosts["b" if worker.role == "prefill" else "c"]
        listening = host.run(["ss", "-ltnpH"], cluster.env()).stdout.splitlines()
        bound = [line.split()[3].rpartition(":") for line in listening if f"pid={worker.pid}," in line]
        ours = [(address, port) for address, _, port in bound if int(port) not in _RAY_WORKER_PORTS]
        assert ours and all(address == host.ip for address, _ in ours), (worker.worker, bound)


# What KubeRay's default probes fetch in each Ray container (the head checks the GCS too); they send no token.
_PROBES = {"a": ["52365/api/local_raylet_healthz", "8265/api/gcs_healthz"], "b": ["52365/api/local_raylet_healthz"],
           "c": ["52365/api/local_raylet_healthz"], "d": ["52365/api/local_raylet_healthz"]}
_FETCH = ("import sys, urllib.request, urllib.error\n"
          "try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())\n"
          "except urllib.error.HTTPError as e:\n    print(e.code)")


def test_kuberay_probes_pass_under_token_auth_and_the_dashboard_api_does_not(cluster: Cluster) -> None:
    """Token auth on: the health paths KubeRay probes answer without the token; the dashboard's API refuses."""
    env = {k: v for k, v in cluster.env().items() if not k.startswith("RAY_AUTH")}
    for name, paths in _PROBES.items():
        for path in paths:
            got = cluster.net.hosts[name].run([sys.executable, "-c", _FETCH, f"http://127.0.0.1:{path}"], env)
            assert "success" in got.stdout, (name, path, got.stdout, got.stderr)
    got = cluster.head.run([sys.executable, "-c", _FETCH, "http://127.0.0.1:8265/api/jobs/"], env)
    assert got.stdout.strip() in ("401", "403"), got.stdout + got.stderr


def test_a_killed_decode_worker_comes_back(cluster: Cluster, expected: list[list[int]]) -> None:
    router = cluster.routers[0]
    (worker,) = _decode_workers(router)
    decode_host = cluster.net.hosts["c"]
    assert decode_host.run(["kill", "-9", str(worker.pid)], cluster.env()).returncode == 0
    deadline = time.monotonic() + 60
    for router in cluster.routers:  # each router sees it back at its own next health poll
        while True:
            workers = _decode_workers(router)
            if workers and workers[0].alive and workers[0].pid != worker.pid:
                break
            assert time.monotonic() < deadline, f"the decode worker did not come back:\n{cluster.logs()}"
            time.sleep(0.5)
    for router in cluster.routers:
        assert _grpc_tokens(router, PROMPTS[0]) == expected[0]


def test_a_decode_group_that_scales_up_takes_load(cluster: Cluster, expected: list[list[int]]) -> None:
    router = cluster.routers[0]
    failures: list[str] = []
    done = threading.Event()
    served = [0]

    def load() -> None:
        while not done.is_set():
            i = served[0] % len(PROMPTS)
            try:
                if _grpc_tokens(router, PROMPTS[i]) != expected[i]:
                    failures.append(f"wrong answer to prompt {i}")
            except grpc.RpcError as e:
                failures.append(f"{e.code()}: {e.details()}")
            served[0] += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        cluster.add_node("e", "decode")
        deadline = time.monotonic() + 90
        while len([w for w in _decode_workers(router) if w.alive]) < 2:
            assert time.monotonic() < deadline, f"the second decode worker never joined:\n{cluster.logs()}"
            time.sleep(0.5)
        time.sleep(2)
    finally:
        done.set()
        thread.join(120)
    assert not failures and served[0] > 0, failures
    for router in cluster.routers:
        assert len([w for w in _decode_workers(router) if w.alive]) == 2
        for prompt, want in zip(PROMPTS, expected, strict=True):
            assert _grpc_tokens(router, prompt) == want


class _Load:
    """Requests through one router on a few threads until the block ends; keeps what went wrong."""

    def __init__(self, router: Router, expected: list[list[int]], threads: int = 3) -> None:
        self.router = router
        self.expected = expected
        self.failures: list[str] = []
        self.served = 0
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, offset: int) -> None:
        i = offset
        while not self._done.is_set():
            prompt = i % len(PROMPTS)
            try:
                if _grpc_tokens(self.router, PROMPTS[prompt]) != self.expected[prompt]:
                    self.failures.append(f"wrong answer to prompt {prompt}")
            except grpc.RpcError as e:
                self.failures.append(f"{e.code()}: {e.details()}")
            self.served += 1
            i += 1

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(120)


def _wait_for_decode_workers(cluster: Cluster, count: int, timeout_s: float = 60) -> None:
    """Until every router's pools hold exactly `count` decode workers, all alive."""
    deadline = time.monotonic() + timeout_s
    for router in cluster.routers:
        while not ((workers := _decode_workers(router)) and len(workers) == count and all(w.alive for w in workers)):
            assert time.monotonic() < deadline, f"router {router.host.name} has {workers}:\n{cluster.logs()}"
            time.sleep(0.5)


def _prompt_tokens_seen(cluster: Cluster, worker: str) -> float:
    """Prompt tokens the worker looked up in its prefix cache, as every router counted them: one lookup per
    request a decode worker takes."""
    return sum(_metric(r, "pdserve_prefix_cache_queries_total", worker=worker) for r in cluster.routers)


def test_a_draining_decode_node_finishes_its_requests_and_leaves(cluster: Cluster,
                                                                 expected: list[list[int]]) -> None:
    """Host e's decode node (from the scale-up test) runs a pod's pre-stop hook, then stops, under load."""
    if "e" not in cluster.net.hosts:  # this test ran alone
        cluster.add_node("e", "decode")
        _wait_for_decode_workers(cluster, 2, timeout_s=90)
    host = cluster.net.hosts["e"]
    with _Load(cluster.routers[0], expected) as load:
        drained = host.run(["pdserve", "drain-node", "--timeout-s", "60"], cluster.env(), timeout=90)
        assert drained.returncode == 0, f"{drained.stdout}{drained.stderr}\n{cluster.logs()}"
        (worker,) = re.findall(r"pdserve-(decode-[0-9a-f]{12}-\d+)", drained.stdout)
        time.sleep(1.5)  # every router has polled the worker since its last request ended
        before = _prompt_tokens_seen(cluster, worker)
        time.sleep(2)
        assert _prompt_tokens_seen(cluster, worker) == before > 0, "a router sent the draining worker requests"
        stopped = host.run(["ray", "stop"], cluster.env(), timeout=60)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        _wait_for_decode_workers(cluster, 1)
        time.sleep(1)
    assert not load.failures and load.served > 0, load.failures
    for router in cluster.routers:
        assert [w.worker for w in _decode_workers(router)] != [worker]
        for prompt, want in zip(PROMPTS, expected, strict=True):
            assert _grpc_tokens(router, prompt) == want


def test_a_router_with_api_keys_and_tls_serves_across_hosts(
    cluster: Cluster, expected: list[list[int]], make_test_model: Callable[..., Path]
) -> None:
    """A third router pod on host g, rendered with the chart's auth and tls values: the official openai client
    with a key over HTTPS and gRPC with SSL channel credentials get transformers' answers; without a key, 401 and
    UNAUTHENTICATED."""
    host = cluster.add_node("g", "router-ray")
    pki = cluster.shared / "pki"  # where every host sees it (each has a /tmp of its own)
    pki.mkdir()
    router = cluster.start_secured_router(host, ["sk-multihost"], make_pki(pki, host.ip))
    try:
        deadline = time.monotonic() + 120
        while not router.serving():
            assert router.process.poll() is None and time.monotonic() < deadline, cluster.logs()
            time.sleep(0.5)
        assert router.ca is not None
        verify = httpx.Client(verify=ssl.create_default_context(cafile=str(router.ca)), timeout=60)
        client = openai.OpenAI(base_url=f"{router.http_base}/v1", api_key="sk-multihost", max_retries=0,
                               http_client=verify)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt=PROMPTS[1], temperature=0.0, max_tokens=NUM_OUT,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == Tokenizer(str(make_test_model())).decode(expected[1])
        stranger = openai.OpenAI(base_url=f"{router.http_base}/v1", api_key="sk-wrong", max_retries=0,
                                 http_client=verify)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPTS[2]),
                                     sampling=pb.SamplingParams(temperature=0, max_tokens=NUM_OUT, ignore_eos=True))
        with router.channel() as channel:
            stub = pb_grpc.GenerationStub(channel)
            replies = list(stub.Generate(request, timeout=60, metadata=(("authorization", "Bearer sk-multihost"),)))
            assert [t for r in replies if r.HasField("chunk") for t in r.chunk.token_ids] == expected[2]
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(request, timeout=60))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        router.process.terminate()
        router.process.wait(30)
