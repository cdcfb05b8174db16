"""Offline checks of the Helm chart helm/pdserve and the KubeRay example: no cluster and no helm binary.

The chart is rendered with Helm's own engine (helm-python-sdk) for the default values and for every values
file in tests/deploy/values/. Core Kubernetes objects, and the pod templates inside the RayCluster, are
validated strictly against the API schemas of the oldest and newest Kubernetes the chart supports
(kubernetes-validate). Custom resources (RayCluster, ServiceMonitor, PodMonitor) are checked field by field.
"""

from __future__ import annotations

import functools
import json
import re
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "pdserve"
GRAFANA = REPO / "deploy" / "grafana"
KUBERAY_EXAMPLE = REPO / "deploy" / "kuberay" / "raycluster.yaml"
VALUES_DIR = Path(__file__).resolve().parent / "values"
# The chart's kubeVersion floor (gRPC probes are GA from 1.27) and the newest schema kubernetes-validate has.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
RELEASE, NAMESPACE = "demo", "llm"
CUSTOM_KINDS = {"RayCluster", "ServiceMonitor", "PodMonitor"}
MODEL_MOUNT = "/models"

SCENARIOS: dict[str, dict[str, Any]] = {"default": {}} | {
    path.stem: yaml.safe_load(path.read_text()) for path in sorted(VALUES_DIR.glob("*.yaml"))
}


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@functools.cache
def _render(scenario: str, release: str = RELEASE) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(effective values, rendered objects) for a scenario; cached because every test reads the same."""
    with helm.Chart.load(CHART) as loaded:
        values = SCENARIOS[scenario]
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


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


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
    """Decode KubeRay's shell-quoted `resources` rayStartParam: '"{\\"prefill\\": 1}"'."""
    raw = params["resources"]
    assert raw.startswith('"') and raw.endswith('"'), f"resources must be quoted for the shell: {raw!r}"
    decoded: dict[str, float] = json.loads(raw[1:-1].replace('\\"', '"'))
    return decoded


def _ray_pod_checks(template: dict[str, Any], shm_limit: str | None) -> None:
    spec = template["spec"]
    container = spec["containers"][0]
    assert container["image"], "Ray container needs an image"
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    assert "/dev/shm" in mounts, "Ray pods need /dev/shm for UCX and the object store"
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    if shm_limit is not None:
        assert shm["sizeLimit"] == shm_limit


def check_raycluster(rc: dict[str, Any], groups: list[str]) -> None:
    """The fields KubeRay requires, on any RayCluster this project ships."""
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams must be strings"
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
        assert group["template"]["spec"]["containers"]
        _ray_pod_checks(group["template"], None)
        _validate_core(_as_pod(group["template"], f"ray-{group['groupName']}"))


def _ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.split("==")[1] for d in deps if re.match(r"ray(\[.*\])?==", d)]
    return str(pin)


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


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_core_objects_validate_strictly(scenario: str) -> None:
    _, objects = _render(scenario)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "RayCluster"} <= kinds
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        assert "." not in obj["apiVersion"].split("/")[0] or obj["apiVersion"].endswith(".k8s.io/v1"), obj
        _validate_core(obj)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_raycluster(scenario: str) -> None:
    values, objects = _render(scenario)
    rc = _one(objects, "RayCluster")
    groups = ["prefill", "decode"] if values["mode"] == "disagg" else ["decode"]
    check_raycluster(rc, groups)
    assert rc["spec"]["rayVersion"] == values["rayCluster"]["rayVersion"] == _ray_pin()
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in rc["spec"]["workerGroupSpecs"]:
        want = values["workers"][group["groupName"]]
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (
            want["replicas"], want["minReplicas"], want["maxReplicas"])
        assert _custom_resources(group["rayStartParams"]) == {group["groupName"]: want["actorsPerPod"]}
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


def _arg(args: list[str], flag: str) -> str:
    assert flag in args, f"router args lack {flag}: {args}"
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_router(scenario: str) -> None:
    values, objects = _render(scenario)
    deploy = _one(objects, "Deployment")
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "serve"
    assert _arg(args, "--mode") == values["mode"]
    rc_name = _one(objects, "RayCluster")["metadata"]["name"]
    assert _arg(args, "--ray-address") == f"ray://{rc_name}-head-svc.{NAMESPACE}.svc.cluster.local:10001"
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
    assert int(_arg(args, "--block-size")) == serving["blockSize"]
    assert (_arg(args, "--grpc-port"), _arg(args, "--http-port")) == ("50051", "8000")

    assert _arg(args, "--served-model-name") == values["model"]["servedModelName"]

    # The model: read-only at the same path in the router and every Ray pod, or a path inside the image.
    model = _arg(args, "--model")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    if values["model"]["source"] == "image":
        assert model == values["model"]["image"]["path"] and MODEL_MOUNT not in mounts
    else:
        assert model == MODEL_MOUNT and mounts[MODEL_MOUNT]["readOnly"] is True
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mounts[MODEL_MOUNT]["name"])
        key = {"pvc": "persistentVolumeClaim", "hostPath": "hostPath"}[values["model"]["source"]]
        assert key in volume
    ray_pods = [g["template"] for g in _one(objects, "RayCluster")["spec"]["workerGroupSpecs"]]
    for ray_pod in ray_pods:
        ray_mounts = {m["mountPath"]: m for m in ray_pod["spec"]["containers"][0].get("volumeMounts", [])}
        assert (MODEL_MOUNT in ray_mounts) == (MODEL_MOUNT in mounts)

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    pod_sc, sc = pod["spec"]["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and "/tmp" in mounts

    service = _one(objects, "Service")
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    svc_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(svc_ports) == {"grpc", "http", "metrics"}
    assert all(p["targetPort"] in container_ports for p in svc_ports.values())
    assert container_ports[svc_ports["metrics"]["targetPort"]] == 8000, "/metrics is served on HTTP 8000"
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert len(pdbs) == int(values["router"]["podDisruptionBudget"]["enabled"])
    for pdb in pdbs:
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


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


def test_packaged_chart_carries_dashboards_and_schema(tmp_path: Path) -> None:
    # `helm package` dereferences the dashboards/ symlink: the published archive holds the files themselves.
    archive = helm.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert "pdserve/values.schema.json" in members
        for path in GRAFANA.glob("*.json"):
            member = members[f"pdserve/dashboards/{path.name}"]
            assert member.isfile()
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read() == path.read_bytes()


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
    ({"workers": {"decode": {"shmSizeLimit": "lots"}}}, "/workers/decode/shmSizeLimit"),
    ({"router": {"replica": 3}}, "'replica' not allowed"),
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


def test_long_release_name_fits_dns_limits() -> None:
    release = "a-very-long-release-name-for-pdserve-that-is-53-chars"[:53]
    _, objects = _render("gpu-cluster", release)
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
    rc = _one(objects, "RayCluster")["metadata"]["name"]
    assert len(f"{rc}-head-svc") <= 63  # the Service KubeRay creates for the head


def test_kuberay_example_manifest() -> None:
    (rc,) = [d for d in yaml.safe_load_all(KUBERAY_EXAMPLE.read_text()) if d]
    check_raycluster(rc, ["prefill", "decode"])
    assert rc["spec"]["rayVersion"] == _ray_pin()
    for group in rc["spec"]["workerGroupSpecs"]:
        assert _custom_resources(group["rayStartParams"]) == {group["groupName"]: 1}


def test_notes_and_readme_send_the_served_model_name() -> None:
    """The curl in NOTES.txt and the README's install section use the name the router serves, not a 404."""
    with helm.Chart.load(CHART) as loaded:
        manifests = loaded.render({"model": {"servedModelName": "llama-3-8b"}}, name=RELEASE, namespace=NAMESPACE)
        default = loaded.merge_values({})["model"]["servedModelName"]
    notes = next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    assert '"model": "llama-3-8b"' in notes
    readme = (CHART.parents[1] / "README.md").read_text()
    install = readme[readme.index("### Install"):readme.index("### The values that matter")]
    assert f'"model": "{default}"' in install
