"""API keys and TLS on real `pdserve serve` processes, through the official openai client, raw httpx and gRPC.

Two servers (colocated, one worker):
  keys  API keys from all three sources (--api-key, --api-key-file, PDSERVE_API_KEYS) and --auth-all-endpoints,
        over plain text.
  tls   one key, TLS with client certificates required (--tls-cert/--tls-key/--tls-client-ca); health, /metrics
        and reflection left open, as by default.
A throwaway CA, a server certificate (127.0.0.1, localhost) and a client certificate are made with the openssl
command. The Helm chart's probe and `helm test` hook are run against the TLS server too.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import services.bench.launch as launch_module
from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc
from services.router.auth import MISSING_KEY, WRONG_KEY, ApiKeys, Security, SecurityConfigError
from tests.deploy.pod_commands import render as chart_render
from tests.pki import make_pki
from tests.service.conftest import REPO, RunningServer, start_server

KEYS = ("sk-flag-1", "sk-file-2", "sk-env-3", "sk-env-4")  # --api-key, --api-key-file, PDSERVE_API_KEYS x2
GREEDY: dict[str, Any] = {"prompt": "The harbor was quiet", "max_tokens": 4, "temperature": 0.0,
                          "extra_body": {"ignore_eos": True}}
def _bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


# ---- certificates --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _ssl_context(pki: Path, client_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client_cert:
        context.load_cert_chain(pki / "client.crt", pki / "client.key")
    return context


def _grpc_credentials(pki: Path, client_cert: bool = True) -> grpc.ChannelCredentials:
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes())
    return grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes(), (pki / "client.key").read_bytes(),
                                        (pki / "client.crt").read_bytes())


# ---- servers ---------------------------------------------------------------------------------------------


def _start(tmp: Path, model: str, *args: str, env: dict[str, str] | None = None,
           credentials: grpc.ChannelCredentials | None = None, metadata: tuple[Any, ...] = ()) -> RunningServer:
    """start_server, with the launcher's readiness check speaking TLS and sending a key as this server needs."""

    def serving(port: int) -> bool:
        target = f"127.0.0.1:{port}"
        with grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1,
                                                                  metadata=metadata)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch_module, "_serving", serving)
        return start_server(tmp, model, "--mode", "colocated", *args, env=env)


@pytest.fixture(scope="module")
def keys_server(tmp_path_factory: pytest.TempPathFactory, serve_model_dir: str) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("keys")
    (tmp / "keys.txt").write_text(f"# pdserve keys\n\n  {KEYS[1]}  \n# {KEYS[0]}-not-this\n")
    server = _start(tmp, serve_model_dir, "--api-key", KEYS[0], "--api-key-file", str(tmp / "keys.txt"),
                    "--auth-all-endpoints", env={"PDSERVE_API_KEYS": f" {KEYS[2]}, {KEYS[3]},"},
                    metadata=_bearer(KEYS[0]))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, serve_model_dir: str, pki: Path) -> Iterator[RunningServer]:
    server = _start(tmp_path_factory.mktemp("tls"), serve_model_dir, "--api-key", KEYS[0], "--tls-cert",
                    str(pki / "tls.crt"), "--tls-key", str(pki / "tls.key"), "--tls-client-ca", str(pki / "ca.crt"),
                    credentials=_grpc_credentials(pki))
    yield server
    server.stop()


def _client(base: str, key: str, **http: Any) -> openai.OpenAI:
    http_client = httpx.Client(**http) if http else None
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60, http_client=http_client)


def _model(server: RunningServer, key: str) -> str:
    return _client(server.http_base, key).models.list().data[0].id


# ---- configuration (no server) ---------------------------------------------------------------------------


def test_keys_are_checked_as_bearer_tokens() -> None:
    keys = ApiKeys.of(["k1", "k2"])
    assert keys.refusal("Bearer k1") is None and keys.refusal("bearer k2") is None
    assert keys.refusal("Bearer k3") == WRONG_KEY and keys.refusal("Bearer k1x") == WRONG_KEY
    assert keys.refusal(None) == keys.refusal("") == keys.refusal("Basic k1") == keys.refusal("Bearer ") == MISSING_KEY
    assert keys.http_path_open("/health") and not keys.http_path_open("/v1/models")
    assert not keys.http_path_open("/tokenize") and not keys.http_path_open("/anything")
    assert keys.grpc_method_open("/grpc.health.v1.Health/Check")
    assert not keys.grpc_method_open("/pdserve.v1.Generation/GetLoad")
    closed = ApiKeys.of(["k1"], all_endpoints=True)
    assert not closed.http_path_open("/metrics") and not closed.grpc_method_open("/grpc.health.v1.Health/Check")
    assert ApiKeys().refusal(None) is None and ApiKeys().http_path_open("/v1/completions")


def test_keys_come_from_flags_file_and_environment(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# ops\n\nfile-1\n  file-2  \n")
    security = Security.from_flags(["flag-1"], str(tmp_path / "keys"), env={"PDSERVE_API_KEYS": "env-1, env-2,"})
    assert len(security.api_keys.digests) == 5 and security.tls is None
    assert all(security.api_keys.refusal(f"Bearer {k}") is None for k in ("flag-1", "file-2", "env-2"))
    assert "5 keys" in security.describe() and "flag-1" not in security.describe()
    assert not Security.from_flags(env={}).api_keys.enabled


@pytest.mark.parametrize(("flags", "message"), [
    ({"tls_cert": "tls.crt"}, "TLS needs both --tls-cert and --tls-key"),
    ({"tls_key": "tls.key"}, "TLS needs both --tls-cert and --tls-key"),
    ({"tls_cert": "tls.crt", "tls_key": "missing.key"}, "--tls-key missing.key: cannot read it"),
    ({"tls_cert": "tls.crt", "tls_key": "ca.key"}, "do not load as a PEM certificate chain and its private key"),
    ({"tls_cert": "tls.crt", "tls_key": "tls.key", "tls_client_ca": "ca.cnf"}, "--tls-client-ca ca.cnf is not a PEM"),
    ({"tls_client_ca": "ca.crt"}, "--tls-client-ca needs --tls-cert and --tls-key"),
    ({"auth_all_endpoints": True}, "--auth-all-endpoints needs an API key"),
    ({"api_key_file": "no-keys"}, "--api-key-file no-keys holds no key"),
    ({"api_key": ["two words"]}, "contain no whitespace"),
])
def test_bad_security_flags_are_refused(pki: Path, flags: dict[str, Any], message: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(pki, tmp_path, dirs_exist_ok=True)
    (tmp_path / "no-keys").write_text("# only a comment\n\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SecurityConfigError, match=message):
        Security.from_flags(**flags, env={})


def test_serve_exits_at_once_on_a_bad_flag(pki: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "services.cli", "serve", "--tls-cert", str(pki / "tls.crt")],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PDSERVE_API_KEYS": ""})
    assert done.returncode == 1
    assert done.stderr.strip() == "pdserve serve: error: TLS needs both --tls-cert and --tls-key"


# ---- API keys --------------------------------------------------------------------------------------------


def test_openai_client_with_each_key(keys_server: RunningServer) -> None:
    model = _model(keys_server, KEYS[0])
    texts = set()
    for key in KEYS:
        completion = _client(keys_server.http_base, key).completions.create(model=model, **GREEDY)
        assert completion.usage is not None and completion.usage.completion_tokens == 4
        texts.add(completion.choices[0].text)
    stream = _client(keys_server.http_base, KEYS[2]).completions.create(model=model, stream=True, **GREEDY)
    texts.add("".join(chunk.choices[0].text for chunk in stream if chunk.choices))
    assert len(texts) == 1, texts


def test_wrong_or_missing_key_gets_401(keys_server: RunningServer) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(keys_server.http_base, "sk-wrong").completions.create(model="any", **GREEDY)
    assert refused.value.status_code == 401
    assert refused.value.response.json() == {"error": {"message": WRONG_KEY, "type": "authentication_error",
                                                       "param": None, "code": "invalid_api_key"}}
    routes = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
              ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models/any")]
    for header in ({}, {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": f"Bearer {KEYS[0]}-"}):
        for method, path in routes:
            reply = httpx.request(method, f"{keys_server.http_base}{path}", headers=header, json={}, timeout=10)
            assert reply.status_code == 401, (method, path, header)
            assert reply.headers["WWW-Authenticate"] == "Bearer"
            error = reply.json()["error"]
            assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
            assert error["message"] == (WRONG_KEY if header.get("Authorization", "").startswith("Bearer") else
                                        MISSING_KEY)
    tokenized = httpx.post(f"{keys_server.http_base}/tokenize", json={"prompt": "Hello"}, timeout=10,
                           headers={"Authorization": f"Bearer {KEYS[3]}"})
    assert tokenized.status_code == 200 and tokenized.json()["count"] > 0


def test_grpc_needs_the_key(keys_server: RunningServer) -> None:
    stub = keys_server.stub()
    assert stub.GetModelInfo(pb.ModelInfoRequest(), metadata=_bearer(KEYS[1]), timeout=10).model
    request = pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True))
    replies = list(stub.Generate(request, metadata=_bearer(KEYS[2]), timeout=60))
    assert replies[-1].complete.usage.completion_tokens == 3
    for metadata, message in (((), MISSING_KEY), (_bearer("sk-wrong"), WRONG_KEY),
                              ((("authorization", KEYS[0]),), MISSING_KEY)):
        with pytest.raises(grpc.RpcError) as unary:
            stub.GetModelInfo(pb.ModelInfoRequest(), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as streaming:
            list(stub.Generate(request, metadata=metadata, timeout=10))
        for refused in (unary, streaming):
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert refused.value.details() == message


def test_auth_all_endpoints_closes_health_metrics_and_reflection(keys_server: RunningServer) -> None:
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{keys_server.http_base}{path}", timeout=10).status_code == 401
        reply = httpx.get(f"{keys_server.http_base}{path}", headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=10)
        assert reply.status_code == 200
    with grpc.insecure_channel(keys_server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        serving = health.Check(health_pb2.HealthCheckRequest(), metadata=_bearer(KEYS[3]), timeout=10)
        assert serving.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            _list_services(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "pdserve.v1.Generation" in _list_services(channel, _bearer(KEYS[0]))


def _list_services(channel: grpc.Channel, metadata: tuple[Any, ...] = ()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                        metadata=metadata, timeout=10)
    return [s.name for reply in replies for s in reply.list_services_response.service]


def test_start_up_log_says_auth_is_on_without_the_keys(keys_server: RunningServer) -> None:
    log = keys_server.log()
    assert "API key authentication is on (4 keys; all endpoints); TLS is off" in log
    assert not [key for key in KEYS if key in log]


# ---- TLS -------------------------------------------------------------------------------------------------


def _https(server: RunningServer) -> str:
    return server.http_base.replace("http://", "https://")


def test_grpc_over_mutual_tls(tls_server: RunningServer, pki: Path) -> None:
    with grpc.secure_channel(tls_server.grpc_target, _grpc_credentials(pki)) as channel:
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True))
        replies = list(stub.Generate(request, metadata=_bearer(KEYS[0]), timeout=60))
        assert replies[-1].complete.usage.completion_tokens == 3
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, "TLS does not replace the key"
        # Open by default: health checks and reflection need no key.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert "pdserve.v1.Generation" in _list_services(channel)


def test_grpc_refuses_plain_text_and_clients_without_a_certificate(tls_server: RunningServer, pki: Path) -> None:
    for channel in (grpc.insecure_channel(tls_server.grpc_target),
                    grpc.secure_channel(tls_server.grpc_target, _grpc_credentials(pki, client_cert=False))):
        with channel, pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_https_with_the_openai_client(tls_server: RunningServer, pki: Path) -> None:
    client = _client(_https(tls_server), KEYS[0], verify=_ssl_context(pki))
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, **GREEDY)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=model, stream=True, **GREEDY)
                       if c.choices)
    assert streamed == completion.choices[0].text and completion.usage and completion.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        _client(_https(tls_server), "sk-wrong", verify=_ssl_context(pki)).models.list()
    with httpx.Client(verify=_ssl_context(pki)) as http:  # open by default
        assert http.get(f"{_https(tls_server)}/health").status_code == 200
        assert "pdserve_" in http.get(f"{_https(tls_server)}/metrics").text


def test_https_refuses_plain_text_and_clients_without_a_certificate(tls_server: RunningServer, pki: Path) -> None:
    clients = [_client(tls_server.http_base, KEYS[0]),  # http:// to the TLS port
               _client(_https(tls_server), KEYS[0], verify=_ssl_context(pki, client_cert=False)),
               _client(_https(tls_server), KEYS[0])]  # the system's CAs do not know this server
    for client in clients:
        with pytest.raises(openai.APIConnectionError):
            client.models.list()


def test_chart_probe_and_helm_test_work_against_mutual_tls(tls_server: RunningServer, pki: Path,
                                                          tmp_path: Path) -> None:
    """The chart with API keys and client certificates: its router probe (wget, presenting the Secret's tls.crt)
    and its `helm test` script run against this server, with the Secrets' files here."""
    assert shutil.which("wget"), "the chart's probe runs wget (the pdserve images have it); install it here too"
    served = _client(_https(tls_server), KEYS[0], verify=_ssl_context(pki)).models.list().data[0].id
    (tmp_path / "api-keys").write_text(f"# the first key is sent\n{KEYS[0]}\nsk-other\n")
    values = {"auth": {"apiKeys": {"existingSecret": "keys"}}, "tls": {"existingSecret": "certs", "clientAuth": True},
              "model": {"servedModelName": served}}
    objects = chart_render(values)

    def here(text: str) -> str:
        text = text.replace("/etc/pdserve/tls", str(pki)).replace("/etc/pdserve/api-keys/api-keys",
                                                                   str(tmp_path / "api-keys"))
        return text.replace("127.0.0.1:8000", f"127.0.0.1:{tls_server.http_port}")

    (cluster,) = [o for o in objects if o["kind"] == "RayCluster"]
    (router_group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "router"]
    router = router_group["template"]["spec"]["containers"][1]
    probe = [here(arg) for arg in router["readinessProbe"]["exec"]["command"]]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=30, env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, (probe, done.stderr)

    (pod,) = [o for o in objects if o["kind"] == "Pod"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: here(e["value"]) for e in container["env"]}
    env["COMPLETIONS_URL"] = f"{_https(tls_server)}/v1/completions"
    done = subprocess.run([sys.executable, "-c", container["command"][2]], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env, "RETRY_S": "5"})
    assert done.returncode == 0 and done.stdout.startswith("200 "), done.stdout + done.stderr
