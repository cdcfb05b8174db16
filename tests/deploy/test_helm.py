"""Offline checks of the Helm chart helm/pdserve and the KubeRay example: no cluster and no helm binary.

The chart is rendered with Helm's own engine (helm-python-sdk) for the default values and for every values
file in tests/deploy/values/. Core Kubernetes objects, and the pod templates inside the RayCluster, are
validated strictly against the API schemas of the oldest and newest Kubernetes the chart supports
(kubernetes-validate). Custom resources (RayCluster, ServiceMonitor, PodMonitor, PrometheusRule) are checked
field by field. What the pods run is read through tests/deploy/pod_commands.py, the same reading the
multi-host tests use, and checked against the real parsers: `ray start`'s and `pdserve serve`'s.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.deploy.pod_commands import ROLES, ContainerCommand, commands_from_objects, quantity
from tests.deploy.pod_commands import render as pod_render

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "pdserve"
GRAFANA = REPO / "deploy" / "grafana"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
KUBERAY_EXAMPLE = REPO / "deploy" / "kuberay" / "raycluster.yaml"
VALUES_DIR = Path(__file__).resolve().parent / "values"
# The chart's kubeVersion floor (gRPC probes are GA from 1.27) and the newest schema kubernetes-validate has.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
RELEASE, NAMESPACE = "demo", "llm"
CUSTOM_KINDS = {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
MODEL_MOUNT = "/models"
TOKEN_DIR, TOKEN_PATH = "/etc/pdserve/ray-token", "/etc/pdserve/ray-token/token"
KV_TOKEN_DIR, KV_TOKEN_PATH = "/etc/pdserve/kv-token", "/etc/pdserve/kv-token/token"

SCENARIOS: dict[str, dict[str, Any]] = {"default": {}} | {
    path.stem: yaml.safe_load(path.read_text()) for path in sorted(VALUES_DIR.glob("*.yaml"))
}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def _render_values(values: dict[str, Any], release: str = RELEASE) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with helm.Chart.load(CHART) as loaded:
        manifests = loaded.render(values, name=release, namespace=NAMESPACE)
        effective = loaded.merge_values(values)
    objects = [
        doc
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return effective, objects


@functools.cache
def _render(scenario: str, release: str = RELEASE) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(effective values, rendered objects) for a scenario; cached because every test reads the same."""
    return _render_values(SCENARIOS[scenario], release)


def _one(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _groups(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in _one(objects, "RayCluster")["spec"]["workerGroupSpecs"]}


def _ray_templates(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template in the RayCluster: "head" and one per worker group."""
    rc = _one(objects, "RayCluster")["spec"]
    return {"head": rc["headGroupSpec"]["template"]} | {n: g["template"] for n, g in _groups(objects).items()}


def _kuberay_labels(template: dict[str, Any], cluster: str, group: str) -> dict[str, str]:
    """The labels a pod from this template carries: KubeRay adds ray.io/cluster and ray.io/group."""
    return template["metadata"].get("labels", {}) | {"ray.io/cluster": cluster, "ray.io/group": group}


def _as_pod(template: dict[str, Any], name: str) -> dict[str, Any]:
    metadata = {"name": name, **template.get("metadata", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def _validate_core(obj: dict[str, Any]) -> None:
    for version in KUBE_VERSIONS:
        problem = ""
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = "/".join(str(part) for part in err.absolute_path)
            problem = f"{obj['kind']} {obj['metadata'].get('name')}, Kubernetes {version}: {where}: {err.message}"
        assert not problem, problem


def _custom_resources(params: dict[str, str]) -> dict[str, float]:
    """KubeRay's `resources` rayStartParam: '{"prefill": 1}', quoted for the shell that runs `ray start`.

    KubeRay itself parses it by trimming the quotes and reading JSON (to add accelerators), so it must parse
    that way, and bash must hand `ray start` the bare JSON.
    """
    raw = params["resources"]
    assert raw.startswith("'") and raw.endswith("'"), f"resources must be quoted for the shell: {raw!r}"
    decoded: dict[str, float] = json.loads(raw.strip("'\"` "))
    return decoded


def _ray_pod_checks(template: dict[str, Any], shm_limit: str | None) -> None:
    spec = template["spec"]
    container = spec["containers"][0]
    assert container["image"], "Ray container needs an image"
    assert "command" not in container and "args" not in container, "KubeRay writes the Ray container's command"
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    assert "/dev/shm" in mounts, "Ray pods need /dev/shm for UCX and the object store"
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    if shm_limit is not None:
        assert shm["sizeLimit"] == shm_limit


def _token_checks(template: dict[str, Any], secret: str) -> None:
    """Every container reads the Ray token from the Secret, read-only, mode 0400, with RAY_AUTH_MODE=token."""
    spec = template["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    assert spec["securityContext"].get("fsGroup") == 10001, "the 0400 token file is readable through fsGroup"
    for container in spec["containers"]:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE") == "token", container["name"]
        assert env.get("RAY_AUTH_TOKEN_PATH") == TOKEN_PATH, container["name"]
        (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == TOKEN_DIR]
        assert mount["readOnly"] is True
        source = volumes[mount["name"]]["secret"]
        assert source["secretName"] == secret and source["defaultMode"] == 0o400
        assert source["items"] == [{"key": "token", "path": "token"}]


def check_raycluster(rc: dict[str, Any], groups: list[str]) -> None:
    """The fields KubeRay requires, on any RayCluster this project ships."""
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams must be strings"
    assert head["rayStartParams"]["num-cpus"] == "0", "no actors on the head"
    assert head["template"]["spec"]["containers"], "head template needs containers"
    _validate_core(_as_pod(head["template"], "ray-head"))
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert names == groups
    for group in spec["workerGroupSpecs"]:
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(group[key], int) and group[key] >= 0, f"{group['groupName']}.{key}"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams must be strings"
        assert set(_custom_resources(params)) == {group["groupName"]}
        assert re.fullmatch(r"[0-9]+", params["num-cpus"]), "whole CPUs: the pools share them out"
        assert group["template"]["spec"]["containers"]
        _ray_pod_checks(group["template"], None)
        _validate_core(_as_pod(group["template"], f"ray-{group['groupName']}"))
    router = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "router")
    assert router["replicas"] == router["minReplicas"] == router["maxReplicas"], "routers never autoscale"
    assert router["rayStartParams"]["num-cpus"] == "0" and _custom_resources(router["rayStartParams"]) == {
        "router": 1}


def _ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.split("==")[1] for d in deps if re.match(r"ray(\[.*\])?==", d)]
    return str(pin)


def _arg(args: list[str], flag: str) -> str:
    assert flag in args, f"router args lack {flag}: {args}"
    return args[args.index(flag) + 1]


def _serve_args(command: ContainerCommand) -> list[str]:
    """The `pdserve` arguments of the router container: what follows the wait for the local Ray node."""
    argv = command.argv
    assert argv[:2] == ["/bin/sh", "-c"] and "ray_current_cluster" in argv[2] and argv[2].endswith(
        'exec pdserve "$@"'), argv
    assert argv[3] == "pdserve"  # $0 of the script
    return argv[4:]


# Values and schema ---------------------------------------------------------------------------------------


def test_values_files_present() -> None:
    assert {"gpu-cluster", "cpu-dev", "monitoring-off"} <= set(SCENARIOS)


def test_schema_ships_with_chart(chart: Any) -> None:
    # Chart.load applies .helmignore, so this fails if the schema were ignored.
    assert chart.schema is not None and chart.schema["additionalProperties"] is False


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_passes(scenario: str) -> None:
    report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE, kube_version="v1.37.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


BAD_VALUES = [
    ({"workers": {"prefill": {"replicas": -1}}}, "/workers/prefill/replicas"),
    ({"workers": {"decode": {"gpus": -2}}}, "/workers/decode/gpus"),
    ({"mode": "mixed"}, "/mode"),
    ({"model": {"source": None}}, "missing property 'source'"),
    ({"model": {"source": "s3"}}, "/model/source"),
    ({"model": {"source": "pvc", "pvc": {"claimName": ""}}}, "/model/pvc/claimName"),
    ({"model": {"source": "hostPath"}}, "/model/hostPath/path"),
    ({"model": {"source": "image"}}, "/model/image/path"),
    ({"serving": {"transfer": {"failurePolicy": "retry"}}}, "/serving/transfer/failurePolicy"),
    ({"serving": {"transfer": {"timeoutS": 0}}}, "/serving/transfer/timeoutS"),
    ({"serving": {"kvCacheMiB": 0}}, "/serving/kvCacheMiB"),
    ({"serving": {"maxModelLen": 0}}, "/serving/maxModelLen"),
    ({"serving": {"dtype": "fp8"}}, "/serving/dtype"),
    ({"workers": {"decode": {"shmSizeLimit": "lots"}}}, "/workers/decode/shmSizeLimit"),
    ({"workers": {"decode": {"resources": {"requests": {"cpu": "1500m"}}}}}, "/workers/decode/resources/requests/cpu"),
    ({"workers": {"prefill": {"resources": {"requests": {"cpu": 2.5}}}}}, "/workers/prefill/resources/requests/cpu"),
    ({"workers": {"prefill": {"resources": {"requests": {"cpu": "0"}}}}}, "/workers/prefill/resources/requests/cpu"),
    ({"workers": {"decode": {"resources": {"requests": {"cpu": None}}}}}, "missing property 'cpu'"),
    ({"router": {"replica": 3}}, "'replica' not allowed"),
    ({"router": {"replicas": 0}}, "/router/replicas"),
    ({"router": {"podDisruptionBudget": {"maxUnavailable": "50%"}}}, "/router/podDisruptionBudget/maxUnavailable"),
    ({"rayCluster": {"address": "ray://elsewhere:10001"}}, "'address' not allowed"),
    ({"networkPolicy": {"enable": False}}, "'enable' not allowed"),
    ({"monitoring": {"prometheusRule": {"enabled": "yes"}}}, "/monitoring/prometheusRule/enabled"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_schema_rejects_bad_values(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workers": {"decode": {"replicas": 9}}}, "workers.decode: need minReplicas <= replicas <= maxReplicas"),
        ({"workers": {"prefill": {"minReplicas": 3, "replicas": 2}}}, "workers.prefill: need minReplicas"),
        ({"workers": {"prefill": {"gpus": 1}}}, "GPU workers need the cuda image"),
    ],
)
def test_render_rejects_inconsistent_values(chart: Any, values: dict[str, Any], message: str) -> None:
    chart.validate_schema(values)  # each field alone is valid
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# Objects ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_core_objects_validate_strictly(scenario: str) -> None:
    values, objects = _render(scenario)
    kinds = {o["kind"] for o in objects}
    assert {"Service", "RayCluster", "Secret", "Pod"} <= kinds
    assert "Deployment" not in kinds, "the routers are the RayCluster's router group"
    assert ("NetworkPolicy" in kinds) == values["networkPolicy"]["enabled"]
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        assert "." not in obj["apiVersion"].split("/")[0] or obj["apiVersion"].endswith(".k8s.io/v1"), obj
        _validate_core(obj)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_raycluster(scenario: str) -> None:
    values, objects = _render(scenario)
    rc = _one(objects, "RayCluster")
    groups = ["prefill", "decode", "router"] if values["mode"] == "disagg" else ["decode", "router"]
    check_raycluster(rc, groups)
    assert rc["spec"]["rayVersion"] == values["rayCluster"]["rayVersion"] == _ray_pin()
    for group in rc["spec"]["workerGroupSpecs"]:
        if group["groupName"] == "router":
            continue
        want = values["workers"][group["groupName"]]
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (
            want["replicas"], want["minReplicas"], want["maxReplicas"])
        pod = group["template"]["spec"]
        _ray_pod_checks(group["template"], want["shmSizeLimit"])
        limits = pod["containers"][0]["resources"].get("limits", {})
        if want["gpus"]:
            assert limits["nvidia.com/gpu"] == want["gpus"]
            assert pod["containers"][0]["image"].endswith("cuda")
        else:
            assert "nvidia.com/gpu" not in limits
        assert pod.get("nodeSelector", {}) == want["nodeSelector"]
        assert pod.get("tolerations", []) == want["tolerations"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_worker_groups_are_sized_from_their_pods(scenario: str) -> None:
    """num-cpus is the pod's CPU request, num-gpus its GPUs, resources its actors: what the pools share out."""
    values, objects = _render(scenario)
    for name, group in _groups(objects).items():
        if name == "router":
            continue
        want = values["workers"][name]
        params = group["rayStartParams"]
        cpus = group["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
        assert cpus == want["resources"]["requests"]["cpu"]
        assert params["num-cpus"] == str(int(quantity(cpus)))
        assert params["num-gpus"] == str(want["gpus"])
        assert _custom_resources(params) == {name: want["actorsPerPod"]}
        for key, value in want.get("rayStartParams", {}).items():
            assert params[key] == value, f"workers.{name}.rayStartParams.{key} is passed on"


def test_user_params_cannot_override_sizing() -> None:
    _, objects = _render_values({"workers": {"decode": {"actorsPerPod": 2, "rayStartParams": {
        "num-cpus": "64", "resources": "'{\"GPU\": 8}'", "object-store-memory": "1000000000"}}}})
    params = _groups(objects)["decode"]["rayStartParams"]
    assert params["num-cpus"] == "2" and _custom_resources(params) == {"decode": 2}
    assert params["object-store-memory"] == "1000000000"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_router_group(scenario: str) -> None:
    values, objects = _render(scenario)
    group = _groups(objects)["router"]
    assert group["replicas"] == values["router"]["replicas"]
    template = group["template"]
    ray, router = template["spec"]["containers"]
    assert router["name"] == "router" and "ports" in router
    # The two containers share /tmp/ray: the router's driver finds the node there (address, sockets).
    shared = {m["mountPath"]: m["name"] for m in ray["volumeMounts"]}
    assert shared["/tmp/ray"] == {m["mountPath"]: m["name"] for m in router["volumeMounts"]}["/tmp/ray"]
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == shared["/tmp/ray"])
    assert "emptyDir" in volume
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert router[probe]["grpc"]["port"] == 50051
    pod_sc = template["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    for container in (ray, router):
        sc = container["securityContext"]
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_router_args(scenario: str) -> None:
    values, objects = _render(scenario)
    router = _groups(objects)["router"]["template"]["spec"]["containers"][1]
    args = router["args"]
    assert args[0] == "serve"
    assert _arg(args, "--ray-address") == "auto" and "--worker-group-resources" in args
    assert _arg(args, "--mode") == values["mode"]
    decode = values["workers"]["decode"]
    assert int(_arg(args, "--decode-workers")) == decode["replicas"] * decode["actorsPerPod"]
    if values["mode"] == "disagg":
        prefill = values["workers"]["prefill"]
        assert int(_arg(args, "--prefill-workers")) == prefill["replicas"] * prefill["actorsPerPod"]
    serving = values["serving"]
    assert int(_arg(args, "--slo-ttft-ms")) == serving["slo"]["ttftMs"]
    assert int(_arg(args, "--slo-tpot-ms")) == serving["slo"]["tpotMs"]
    assert float(_arg(args, "--transfer-timeout-s")) == serving["transfer"]["timeoutS"]
    assert _arg(args, "--transfer-failure-policy") == serving["transfer"]["failurePolicy"]
    assert int(_arg(args, "--kv-cache-mb")) == serving["kvCacheMiB"]
    for key, flag in (("blockSize", "--block-size"), ("maxModelLen", "--max-model-len"), ("dtype", "--dtype"),
                      ("kvCacheDtype", "--kv-cache-dtype")):
        if serving.get(key) is None:
            assert flag not in args, f"{flag} is left to pdserve when serving.{key} is null"
        else:
            assert _arg(args, flag) == str(serving[key])
    assert (_arg(args, "--grpc-port"), _arg(args, "--http-port")) == ("50051", "8000")
    assert _arg(args, "--served-model-name") == values["model"]["servedModelName"]

    # The model: read-only at the same path in the router and every Ray pod, or a path inside the image.
    model = _arg(args, "--model")
    mounts = {m["mountPath"]: m for m in router["volumeMounts"]}
    if values["model"]["source"] == "image":
        assert model == values["model"]["image"]["path"] and MODEL_MOUNT not in mounts
    else:
        assert model == MODEL_MOUNT and mounts[MODEL_MOUNT]["readOnly"] is True
    for name, ray_pod in _ray_templates(objects).items():
        if name != "router":
            ray_mounts = {m["mountPath"] for m in ray_pod["spec"]["containers"][0].get("volumeMounts", [])}
            assert (MODEL_MOUNT in ray_mounts) == (MODEL_MOUNT in mounts)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_router_service_and_budget_select_router_pods(scenario: str) -> None:
    """The Service and the PDB find the router pods by the labels KubeRay gives them, and only those."""
    values, objects = _render(scenario)
    rc_name = _one(objects, "RayCluster")["metadata"]["name"]
    template = _groups(objects)["router"]["template"]
    router = template["spec"]["containers"][1]
    labels = _kuberay_labels(template, rc_name, "router")
    service = _one(objects, "Service")
    assert service["spec"]["selector"] == {"ray.io/cluster": rc_name, "ray.io/group": "router"}
    for other in ("head", "prefill", "decode"):
        if other in _ray_templates(objects):
            other_labels = _kuberay_labels(_ray_templates(objects)[other], rc_name, other)
            assert not service["spec"]["selector"].items() <= other_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    svc_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(svc_ports) == {"grpc", "http", "metrics"}
    assert all(p["targetPort"] in container_ports for p in svc_ports.values())
    assert container_ports[svc_ports["metrics"]["targetPort"]] == 8000, "/metrics is served on HTTP 8000"
    assert service["spec"]["selector"].items() <= labels.items()
    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    budget = values["router"]["podDisruptionBudget"]
    assert len(pdbs) == int(budget["enabled"])
    for pdb in pdbs:
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert "maxUnavailable" not in pdb["spec"], "KubeRay pods honour only an integer minAvailable"
        assert pdb["spec"]["minAvailable"] == max(values["router"]["replicas"] - budget["maxUnavailable"], 0)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ray_token_on_every_container(scenario: str) -> None:
    values, objects = _render(scenario)
    secret = _one(objects, "Secret", "-ray-token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{32,}", token), "a random token of letters and digits"
    for template in _ray_templates(objects).values():
        _token_checks(template, secret["metadata"]["name"])
    rc = _one(objects, "RayCluster")["spec"]
    if values["rayCluster"]["autoscaling"]["enabled"]:  # KubeRay's autoscaler sidecar talks to the GCS too
        options = rc["autoscalerOptions"]
        env = {e["name"]: e["value"] for e in options["env"]}
        assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": TOKEN_PATH}
        assert options["volumeMounts"] == [{"name": "ray-token", "mountPath": TOKEN_DIR, "readOnly": True}]
        assert "ray-token" in {v["name"] for v in rc["headGroupSpec"]["template"]["spec"]["volumes"]}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kv_token_on_every_pod_and_in_the_router_args(scenario: str) -> None:
    """The KV token Secret is mounted read-only (0400) in every Ray and router container, and the routers pass its
    path as --kv-token-file, which the workers read in their own pods."""
    _, objects = _render(scenario)
    secret = _one(objects, "Secret", "-kv-token")
    assert secret["metadata"]["name"] != _one(objects, "Secret", "-ray-token")["metadata"]["name"]
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{32,}", token), "a random token of letters and digits"
    for template in _ray_templates(objects).values():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == KV_TOKEN_DIR]
            assert mount["readOnly"] is True, container["name"]
            source = volumes[mount["name"]]["secret"]
            assert source["secretName"] == secret["metadata"]["name"] and source["defaultMode"] == 0o400
            assert source["items"] == [{"key": "token", "path": "token"}]
    router = commands_from_objects(objects)["router"].argv
    assert router[router.index("--kv-token-file") + 1] == KV_TOKEN_PATH


def test_token_is_random_per_install() -> None:
    # Offline there is no Secret to look up, so each render makes a new token (an upgrade reads the old one).
    first, second = (_one(_render_values({})[1], "Secret", "-ray-token")["data"]["token"] for _ in range(2))
    assert first != second


def _port_numbers(node: Any) -> Iterator[int]:
    """Every containerPort, Service port and NetworkPolicy port in the objects."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containerPort", "port", "targetPort") and isinstance(value, int):
                yield value
            else:
                yield from _port_numbers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _port_numbers(item)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_nothing_reaches_ray_from_outside_by_default(scenario: str) -> None:
    values, objects = _render(scenario)
    assert "ray://" not in json.dumps(objects), "no Ray Client anywhere"
    exposed = values["rayCluster"]["head"]["exposeDashboard"]
    ports = set(_port_numbers(objects))
    assert 10001 not in ports and (8265 in ports) == exposed, "no Ray Client port; the dashboard only if exposed"
    head = _one(objects, "RayCluster")["spec"]["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"gcs-server": 6379, "metrics": 8080} | ({"dashboard": 8265} if exposed else {})
    assert head["rayStartParams"]["dashboard-host"] == ("0.0.0.0" if exposed else "127.0.0.1")
    assert head["serviceType"] == values["rayCluster"]["head"]["serviceType"]
    services = [o for o in objects if o["kind"] == "Service"]
    if scenario == "default":
        assert head["serviceType"] == "ClusterIP"
        assert all(s["spec"]["type"] == "ClusterIP" for s in services)


# NetworkPolicy ---------------------------------------------------------------------------------------------


def _admits(policy: dict[str, Any], pod_labels: dict[str, str], peer_labels: dict[str, str], port: int) -> bool:
    """Whether `policy` lets a same-namespace pod with `peer_labels` reach `port` of a pod with `pod_labels`."""
    if not policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items():
        return False
    for rule in policy["spec"].get("ingress", []):
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule.get("from")
        peer_ok = peers is None or any(
            set(p) == {"podSelector"} and p["podSelector"]["matchLabels"].items() <= peer_labels.items()
            for p in peers)
        if (not ports or port in ports) and peer_ok:
            return True
    return False


def _allowed(policies: list[dict[str, Any]], pod: dict[str, str], peer: dict[str, str], port: int) -> bool:
    selecting = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= pod.items()]
    return not selecting or any(_admits(p, pod, peer, port) for p in selecting)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_network_policy(scenario: str) -> None:
    values, objects = _render(scenario)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    if not values["networkPolicy"]["enabled"]:
        assert not policies
        return
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies)
    rc_name = _one(objects, "RayCluster")["metadata"]["name"]
    pods = {name: _kuberay_labels(t, rc_name, name) for name, t in _ray_templates(objects).items()}
    stranger = {"app.kubernetes.io/name": "other", "app.kubernetes.io/instance": "other"}
    clients_open = not values["networkPolicy"]["clientsFrom"]
    # Ray's fixed ports and a port UCX or Ray might pick: open among the release's pods, closed to others.
    for name, labels in pods.items():
        for port in (6379, 8076, 52365, 34567):
            assert all(_allowed(policies, labels, peer, port) for peer in pods.values()), (name, port)
            assert not _allowed(policies, labels, stranger, port), f"{name}:{port} is open to other pods"
    for port in (50051, 8000):
        assert _allowed(policies, pods["router"], stranger, port) == clients_open
        assert not _allowed(policies, pods["head"], stranger, port)
        assert not _allowed(policies, pods["decode"], stranger, port)
    scraped = values["monitoring"]["podMonitor"]["enabled"] and not values["networkPolicy"]["metricsFrom"]
    assert _allowed(policies, pods["decode"], stranger, 8080) == scraped
    configured = values["networkPolicy"]["clientsFrom"] + values["networkPolicy"]["metricsFrom"]
    release = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pdserve",
                                               "app.kubernetes.io/instance": RELEASE}}}
    peers = [peer for p in policies for rule in p["spec"]["ingress"] for peer in rule.get("from", [])]
    assert all(peer in configured or peer == release for peer in peers), peers


# helm test ----------------------------------------------------------------------------------------------------


class _Completions(BaseHTTPRequestHandler):
    replies: list[tuple[int, dict[str, Any]]] = []
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "body": body})
        status, reply = type(self).replies.pop(0)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def _run_test_pod(pod: dict[str, Any], replies: list[tuple[int, dict[str, Any]]]) -> tuple[int, list[dict[str, Any]]]:
    """Runs the test pod's python against a real local HTTP server that answers `replies` in turn."""
    container = pod["spec"]["containers"][0]
    assert container["command"][:2] == ["python", "-c"]
    env = {e["name"]: e["value"] for e in container["env"]}
    _Completions.replies, _Completions.seen = list(replies), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = re.sub(r"^http://[^/]+", f"http://127.0.0.1:{server.server_port}", env["COMPLETIONS_URL"])
        done = subprocess.run([sys.executable, "-c", container["command"][2]], capture_output=True, text=True,
                              timeout=60, env={**os.environ, **env, "COMPLETIONS_URL": url, "RETRY_S": "5"})
    finally:
        server.shutdown()
        server.server_close()
    return done.returncode, _Completions.seen


def test_helm_test_hook_sends_one_completion() -> None:
    values, objects = _render_values({"model": {"servedModelName": "llama-3-8b"}})
    pod = _one(objects, "Pod", "-test-completion")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    container = pod["spec"]["containers"][0]
    router = _groups(objects)["router"]["template"]["spec"]["containers"][1]
    assert container["image"] == router["image"], "the pdserve image's python"
    env = {e["name"]: e["value"] for e in container["env"]}
    service = _one(objects, "Service")
    assert env["COMPLETIONS_URL"] == (
        f"http://{service['metadata']['name']}:{values['router']['service']['httpPort']}/v1/completions")

    choice = {"choices": [{"index": 0, "text": " world", "finish_reason": "length"}]}
    code, seen = _run_test_pod(pod, [(200, choice)])
    assert code == 0
    assert seen == [{"path": "/v1/completions", "body": {"model": "llama-3-8b", "prompt": "Hello", "max_tokens": 4}}]
    assert _run_test_pod(pod, [(503, {"error": "starting"}), (200, choice)])[0] == 0, "waits out a starting router"
    assert _run_test_pod(pod, [(200, {"choices": []})])[0] != 0
    assert _run_test_pod(pod, [(404, {"error": {"message": "no such model"}})])[0] != 0
    assert _run_test_pod(pod, [(500, {"error": "boom"})])[0] != 0


# Monitoring ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_monitoring_objects(scenario: str) -> None:
    values, objects = _render(scenario)
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == int(values["monitoring"]["serviceMonitor"]["enabled"])
    service = _one(objects, "Service")
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector and selector.items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
        port_names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert monitor["metadata"]["labels"].items() >= values["monitoring"]["serviceMonitor"]["labels"].items()
    pod_monitors = [o for o in objects if o["kind"] == "PodMonitor"]
    assert len(pod_monitors) == int(values["monitoring"]["podMonitor"]["enabled"])
    rc = _one(objects, "RayCluster")
    for monitor in pod_monitors:
        assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": rc["metadata"]["name"]}
        head_ports = {p["name"] for p in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= head_ports


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_prometheus_rule_is_alerts_yml(scenario: str) -> None:
    values, objects = _render(scenario)
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert len(rules) == int(values["monitoring"]["prometheusRule"]["enabled"])
    for rule in rules:
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
        assert rule["metadata"]["labels"].items() >= values["monitoring"]["prometheusRule"]["labels"].items()


def test_chart_alert_rules_are_the_repository_file() -> None:
    # files/alerts.yml is kept as a symlink, as dashboards/ is: a copy that drifted would fail here.
    copy = CHART / "files" / "alerts.yml"
    assert copy.read_bytes() == ALERTS.read_bytes()
    assert copy.is_symlink() and copy.resolve() == ALERTS.resolve()


def test_dashboards_are_the_repository_files() -> None:
    assert (CHART / "dashboards").is_symlink() and (CHART / "dashboards").resolve() == GRAFANA.resolve()
    files = {p.name: p.read_bytes() for p in sorted(GRAFANA.glob("*.json"))}
    assert files, "deploy/grafana/ holds no dashboards"
    _, objects = _render("default")
    maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard")]
    assert all(m["metadata"]["labels"]["grafana_dashboard"] == "1" for m in maps)
    assert all(len(m["data"]) == 1 for m in maps), "one dashboard per ConfigMap"
    shipped = {key: text.encode() for m in maps for key, text in m["data"].items()}
    assert shipped == files
    assert len({m["metadata"]["name"] for m in maps}) == len(maps)
    for name, data in files.items():
        assert re.fullmatch(r"[-._a-zA-Z0-9]+", name) and len(data) < 1024 * 1024
        json.loads(data)
    _, without = _render("monitoring-off")
    assert not [o for o in without if o["kind"] == "ConfigMap"]


def test_packaged_chart_carries_dashboards_alerts_and_schema(tmp_path: Path) -> None:
    # `helm package` dereferences the symlinks: the published archive holds the files themselves.
    archive = helm.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert "pdserve/values.schema.json" in members
        wanted = {f"pdserve/dashboards/{p.name}": p for p in GRAFANA.glob("*.json")}
        for name, path in (wanted | {"pdserve/files/alerts.yml": ALERTS}).items():
            member = members[name]
            assert member.isfile()
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read() == path.read_bytes()


# What the pods run ---------------------------------------------------------------------------------------------


def _ray_start_options() -> Any:
    from ray.scripts.scripts import start

    return start


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing `ray start` imports Ray Serve's models
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pod_commands(scenario: str) -> None:
    """The argv and env of every container, as the multi-host tests run them, parse with the real CLIs."""
    from services.cli import build_parser

    values, objects = _render(scenario)
    commands = commands_from_objects(objects)
    expected = [r for r in ROLES if r != "prefill" or values["mode"] == "disagg"]
    assert list(commands) == expected
    secret = _one(objects, "Secret", "-ray-token")["metadata"]["name"]
    kv_secret = _one(objects, "Secret", "-kv-token")["metadata"]["name"]
    start = _ray_start_options()
    groups = _groups(objects)
    for role, command in commands.items():
        assert command.env["RAY_AUTH_MODE"] == "token" and command.env["RAY_AUTH_TOKEN_PATH"] == TOKEN_PATH
        assert command.files == {TOKEN_PATH: f"{{secret:{secret}/token}}",
                                 KV_TOKEN_PATH: f"{{secret:{kv_secret}/token}}"}
        if role == "router":
            continue
        argv = command.argv
        assert argv[:2] == ["ray", "start"] and "--block" in argv
        parsed = start.make_context("start", argv[2:]).params  # `ray start`'s own parser
        assert parsed["head"] == (role == "head")
        if role == "head":
            assert parsed["num_cpus"] == 0
            assert parsed["address"] is None and parsed["dashboard_host"] in ("127.0.0.1", "0.0.0.0")
            assert command.placeholders() <= {"field:metadata.name", "field:metadata.labels['ray.io/cluster']",
                                              "field:metadata.labels['ray.io/group']", f"secret:{secret}/token",
                                              f"secret:{kv_secret}/token"}
            continue
        group = role.removesuffix("-ray")
        assert parsed["num_cpus"] == int(groups[group]["rayStartParams"]["num-cpus"])
        assert parsed["address"] == "{head}:6379" and "head" in command.placeholders()
        assert json.loads(parsed["resources"]) == {group: 1 if group == "router" else values["workers"][group][
            "actorsPerPod"]}
        filled = command.fill({"head": "10.1.0.2"})
        assert "--address=10.1.0.2:6379" in filled.argv and filled.env["RAY_ADDRESS"] == "10.1.0.2:6379"
        assert "head" not in filled.placeholders()

    serve = _serve_args(commands["router"])
    router = groups["router"]["template"]["spec"]["containers"][1]
    assert serve == router["args"]
    args = build_parser(serve).parse_args(serve)  # `pdserve serve`'s own parser
    assert args.command == "serve" and args.ray_address == "auto" and args.worker_group_resources
    assert args.kv_cache_mb == values["serving"]["kvCacheMiB"]
    assert args.max_model_len == values["serving"].get("maxModelLen")
    assert args.dtype == values["serving"].get("dtype")
    assert "head" not in commands["router"].placeholders(), "the router finds Ray through its own node"


def test_pod_commands_follow_kuberay_for_gpus_and_memory() -> None:
    _, objects = _render("gpu-cluster")
    prefill = commands_from_objects(objects)["prefill"]
    assert "--num-gpus=2" in prefill.argv and "--num-cpus=16" in prefill.argv
    assert f"--memory={128 * 1024 ** 3}" in prefill.argv, "KubeRay passes the memory limit"
    decode = commands_from_objects(objects)["decode"]
    assert "--object-store-memory=10000000000" in decode.argv


# Names, example, docs ------------------------------------------------------------------------------------------


def test_long_release_name_fits_dns_limits() -> None:
    release = "a-very-long-release-name-for-pdserve-that-is-53-chars"[:53]
    _, objects = _render("gpu-cluster", release)
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
    rc = _one(objects, "RayCluster")["metadata"]["name"]
    assert len(f"{rc}-head-svc") <= 63  # the Service KubeRay creates for the head


def test_kuberay_example_manifest() -> None:
    docs = [d for d in yaml.safe_load_all(KUBERAY_EXAMPLE.read_text()) if d]
    rc = _one(docs, "RayCluster")
    check_raycluster(rc, ["prefill", "decode", "router"])
    assert rc["spec"]["rayVersion"] == _ray_pin()
    assert "ray://" not in KUBERAY_EXAMPLE.read_text()
    for group in rc["spec"]["workerGroupSpecs"]:
        assert _custom_resources(group["rayStartParams"]) == {group["groupName"]: 1}
        cpus = group["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
        if group["groupName"] != "router":
            assert group["rayStartParams"]["num-cpus"] == str(int(quantity(cpus)))
    templates = [rc["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in rc["spec"]["workerGroupSpecs"]]
    for template in templates:
        _token_checks(template, "pdserve-ray-token")
    commands = commands_from_objects(docs)
    assert list(commands) == list(ROLES)
    args = _serve_args(commands["router"])
    assert _arg(args, "--ray-address") == "auto" and "--worker-group-resources" in args
    service = _one(docs, "Service")
    assert service["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/group": "router"}
    _validate_core(service)


def test_notes_and_readme_send_the_served_model_name() -> None:
    """The curl in NOTES.txt and the README's install section use the name the router serves, not a 404."""
    with helm.Chart.load(CHART) as loaded:
        manifests = loaded.render({"model": {"servedModelName": "llama-3-8b"}}, name=RELEASE, namespace=NAMESPACE)
        default = loaded.merge_values({})["model"]["servedModelName"]
    notes = next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    assert '"model": "llama-3-8b"' in notes
    assert f"helm test {RELEASE}" in notes and "ray://" not in notes
    readme = (CHART.parents[1] / "README.md").read_text()
    install = readme[readme.index("### Install"):readme.index("### The values that matter")]
    assert f'"model": "{default}"' in install
    command = re.search(r"helm install (\S+) ", install)
    assert command
    _, objects = _render_values({}, command.group(1))
    assert f"svc/{_one(objects, 'Service')['metadata']['name']} " in install
    assert f"ray.io/cluster={_one(objects, 'RayCluster')['metadata']['name']}," in install
    assert f"`{_one(objects, 'Secret', '-ray-token')['metadata']['name']}`" in readme


def test_readme_values_table_names_real_keys() -> None:
    """Every `key` in the README's values table is a key of values.yaml (a renamed value shows here)."""
    readme = (CHART.parents[1] / "README.md").read_text()
    table = readme[readme.index("### The values that matter"):readme.index("### Without Helm")]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    keys = re.findall(r"^\| `([^`]+)`", table, re.M)
    assert keys
    for key in keys:
        node: Any = values
        for part in key.split("."):
            if part in ("*", "{prefill,decode}"):
                node = node["decode"]
                continue
            assert isinstance(node, dict) and part in node, f"README names {key}, which values.yaml lacks"
            node = node[part]


def test_worker_pods_drain_before_they_stop() -> None:
    """Prefill and decode pods run `pdserve drain-node` before stopping, with a grace period longer than its wait."""
    objects = pod_render({"workers": {"decode": {"drainTimeoutSeconds": 120}}})
    cluster = next(o for o in objects if o["kind"] == "RayCluster")
    groups = {g["groupName"]: g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]}
    for name, timeout in (("prefill", 300), ("decode", 120)):
        pod = groups[name]
        hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert hook == ["pdserve", "drain-node", "--timeout-s", str(timeout)]
        assert pod["terminationGracePeriodSeconds"] == timeout + 30
    assert "lifecycle" not in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    router = groups["router"]
    assert all("lifecycle" not in c for c in router["containers"])


# API keys and TLS ----------------------------------------------------------------------------------------------

KEYS_SECRET, TLS_SECRET = "pdserve-keys", "pdserve-tls"
TLS_CASES = {"keys only": {}, "tls": {"existingSecret": TLS_SECRET},
             "mtls": {"existingSecret": TLS_SECRET, "clientAuth": True}}


@pytest.mark.parametrize("case", TLS_CASES)
def test_api_keys_and_tls_reach_the_router(case: str) -> None:
    """The users' Secrets become `pdserve serve` flags on files mounted read-only; under TLS the probes, the
    Service, the ServiceMonitor and the test pod follow (tests/service/test_auth_tls.py runs the mTLS probe and
    test pod against a real server)."""
    from services.cli import build_parser

    tls = TLS_CASES[case]
    values = {"auth": {"apiKeys": {"existingSecret": KEYS_SECRET}}, "tls": tls,
              "monitoring": {"serviceMonitor": {"enabled": True}}}
    _, objects = _render_values(values)
    for obj in objects:
        if obj["kind"] not in CUSTOM_KINDS:
            _validate_core(obj)
    template = _groups(objects)["router"]["template"]
    _validate_core(_as_pod(template, "router"))
    router = template["spec"]["containers"][1]
    command = commands_from_objects(objects)["router"]
    args = build_parser(_serve_args(command)).parse_args(_serve_args(command))
    secret_files = {
        args.api_key_file: f"{{secret:{KEYS_SECRET}/api-keys}}",
        **({args.tls_cert: f"{{secret:{TLS_SECRET}/tls.crt}}", args.tls_key: f"{{secret:{TLS_SECRET}/tls.key}}"}
           if tls else {}),
        **({args.tls_client_ca: f"{{secret:{TLS_SECRET}/ca.crt}}"} if tls.get("clientAuth") else {}),
    }
    tokens = {path: command.files[path] for path in (TOKEN_PATH, KV_TOKEN_PATH)}
    assert command.files == {**tokens, **secret_files}
    assert (args.tls_cert is None) == (not tls) and (args.tls_client_ca is None) == (not tls.get("clientAuth"))
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    for mount in router["volumeMounts"]:
        if mount["name"] in ("api-keys", "tls"):
            assert mount["readOnly"] and volumes[mount["name"]]["secret"]["defaultMode"] == 0o400
    for probe in (router[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")):
        if not tls:  # the kubelet's gRPC probe has no TLS; its HTTPS probe skips verification, has no client cert
            assert probe["grpc"] == {"port": 50051}
        elif not tls.get("clientAuth"):
            assert probe["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}
        else:
            assert probe["exec"]["command"][0] == "wget" and f"--private-key={args.tls_key}" in probe["exec"]["command"]
    scheme = "https" if tls else "http"
    assert {p["name"]: p["appProtocol"] for p in _one(objects, "Service")["spec"]["ports"]} == {
        "grpc": "grpc", "http": scheme, "metrics": scheme}
    (endpoint,) = _one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == scheme and ("cert" in endpoint.get("tlsConfig", {})) == bool(tls.get("clientAuth"))
    pod = _one(objects, "Pod", "-test-completion")
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["COMPLETIONS_URL"].startswith(f"{scheme}://") and env["API_KEY_FILE"] == args.api_key_file
    assert env.get("TLS_CLIENT_CERT") == (args.tls_cert if tls.get("clientAuth") else None)
    assert {v["name"] for v in pod["spec"]["volumes"]} == {"api-keys"} | ({"tls"} if tls else set())


def test_security_is_off_by_default_and_schema_checked(chart: Any) -> None:
    values, objects = _render("default")
    assert values["auth"] == {"apiKeys": {"existingSecret": ""}} and values["tls"] == {"existingSecret": "",
                                                                                       "clientAuth": False}
    args = _groups(objects)["router"]["template"]["spec"]["containers"][1]["args"]
    assert not {"--api-key-file", "--tls-cert", "--tls-key", "--tls-client-ca"} & set(args)
    for bad, message in (({"tls": {"clientAuth": True}}, "/tls/existingSecret"),
                         ({"tls": {"existingSecret": "Not_A_Name"}}, "/tls/existingSecret"),
                         ({"auth": {"apiKeys": {"existingSecret": 3}}}, "/auth/apiKeys/existingSecret"),
                         ({"auth": {"apiKey": "sk-1"}}, "'apiKey' not allowed")):
        with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
            chart.validate_schema(bad)


def test_helm_test_hook_sends_the_first_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, objects = _render_values({"auth": {"apiKeys": {"existingSecret": KEYS_SECRET}}})
    pod = _one(objects, "Pod", "-test-completion")
    (tmp_path / "api-keys").write_text("# rotated in March\n\nsk-first\nsk-second\n")
    pod["spec"]["containers"][0]["env"] = [
        e if e["name"] != "API_KEY_FILE" else {**e, "value": str(tmp_path / "api-keys")}
        for e in pod["spec"]["containers"][0]["env"]]
    sent: list[str | None] = []
    answer = _Completions.do_POST

    def do_post(handler: _Completions) -> None:
        sent.append(handler.headers.get("Authorization"))
        answer(handler)

    monkeypatch.setattr(_Completions, "do_POST", do_post)
    code, _ = _run_test_pod(pod, [(200, {"choices": [{"index": 0, "text": " world"}]})])
    assert code == 0 and sent == ["Bearer sk-first"]
