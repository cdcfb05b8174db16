"""What each container of the Helm chart's pods runs: its argv and environment, from the rendered chart.

This is the one source of truth for pod commands outside Kubernetes: tests that start "hosts" of their own
(network namespaces) run exactly these, and tests/deploy/test_helm.py checks them against the chart.

    pod_commands(values) -> {role: ContainerCommand}
    roles: "head", "prefill" (disagg only), "decode", "router-ray" (the Ray node of a router pod),
           "router" (`pdserve serve`, the driver beside it)

The Ray containers' commands are not in the chart: the KubeRay operator writes them. `kuberay_ray_start` does
what the operator does (its BuildPod): it completes rayStartParams (a worker's `address`, `block`,
`metrics-export-port`, `dashboard-agent-listen-port`, the head's `dashboard-host`; `num-cpus`, `memory` and
`num-gpus` from the container's resources when absent), writes `ray start [--head]` with the flags in sorted
order (`--key=value`; `--key` for "true", nothing for "false"), and runs it under bash after
`ulimit -n 65536`. The argv here is that line as bash splits it, without the ulimit. The environment is
the container's own plus what the operator adds to the Ray container (RAY_ADDRESS, RAY_PORT, FQ_RAY_IP, ...;
not the deprecated RAY_IP, nor the head's usage-stats tags).

The router container's argv is the chart's: `/bin/sh -c '<wait for /tmp/ray/ray_current_cluster>; exec pdserve
"$@"' pdserve serve ... --ray-address auto ...`. It waits for its own pod's Ray node (the "router-ray" role),
which shares /tmp/ray with it; hosts that share one filesystem need a /tmp/ray of their own per host.

Placeholders stand for what Kubernetes or KubeRay fill in on a cluster; `ContainerCommand.fill` replaces them:
    {head}               the Ray head's host; KubeRay uses <cluster>-head-svc.<namespace>.svc.cluster.local
    {field:PATH}         an env value from the Downward API (valueFrom.fieldRef), e.g. {field:metadata.name}
    {secret:NAME/KEY}    an env value or a file from a Secret's key
    {configmap:NAME/KEY} an env value from a ConfigMap's key
    {resource:NAME}      an env value from valueFrom.resourceFieldRef
Files that come from Secrets are in `files` (path in the container -> placeholder): the Ray token is one,
and RAY_AUTH_TOKEN_PATH points at it; the KV token is another, whose path the router passes as --kv-token-file.
JSON in an argv (`--resources={"prefill": 1}`) is not a placeholder.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "pdserve"
ROLES = ("head", "prefill", "decode", "router-ray", "router")
HEAD = "{head}"
IMAGE_ENTRYPOINT = ["pdserve"]  # deploy/docker/Dockerfile.*: what a container without `command` runs
DEFAULT_GCS_PORT = "6379"
PLACEHOLDER = re.compile(r"\{(head|(?:field|secret|configmap|resource):[^{}]+)\}")


@dataclass(frozen=True)
class ContainerCommand:
    """One container's process: argv and environment, with placeholders (see the module docstring)."""

    argv: list[str]
    env: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)  # path in the container -> where its content comes from

    def placeholders(self) -> set[str]:
        texts = [*self.argv, *self.env.values(), *self.files.values()]
        return {match for text in texts for match in PLACEHOLDER.findall(text)}

    def fill(self, values: Mapping[str, str]) -> ContainerCommand:
        """A copy with each {name} in `values` replaced, e.g. fill({"head": "10.0.0.1"})."""

        def sub(text: str) -> str:
            return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)

        return ContainerCommand([sub(a) for a in self.argv], {k: sub(v) for k, v in self.env.items()},
                                {k: sub(v) for k, v in self.files.items()})


def render(values: Mapping[str, Any] | None = None, release: str = "demo",
           namespace: str = "llm") -> list[dict[str, Any]]:
    """The chart's objects for these values (helm-python-sdk, offline), NOTES.txt left out."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(dict(values or {}), name=release, namespace=namespace)
    return [doc for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def pod_commands(values: Mapping[str, Any] | None = None, release: str = "demo",
                 namespace: str = "llm") -> dict[str, ContainerCommand]:
    """{role: ContainerCommand} of the chart rendered with `values`."""
    return commands_from_objects(render(values, release, namespace))


def commands_from_objects(objects: list[dict[str, Any]]) -> dict[str, ContainerCommand]:
    (cluster,) = [o for o in objects if o["kind"] == "RayCluster"]
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    head_port = head.get("rayStartParams", {}).get("port", DEFAULT_GCS_PORT)
    commands = {"head": _ray_container(head, "head", head_port)}
    for group in spec.get("workerGroupSpecs", []):
        name = group["groupName"]
        role = "router-ray" if name == "router" else name
        commands[role] = _ray_container(group, "worker", head_port)
        volumes = group["template"]["spec"].get("volumes", [])
        for container in group["template"]["spec"]["containers"][1:]:
            commands[container["name"]] = ContainerCommand(
                (container.get("command") or IMAGE_ENTRYPOINT) + container.get("args", []),
                _env(container), _secret_files(container, volumes))
    return commands


def _ray_container(group: dict[str, Any], node_type: str, head_port: str) -> ContainerCommand:
    pod = group["template"]["spec"]
    container = pod["containers"][0]  # KubeRay's Ray container
    line = kuberay_ray_start_line(group.get("rayStartParams", {}), node_type, container.get("resources", {}),
                                  head_port)
    env = _env(container)
    if node_type == "worker":
        env["FQ_RAY_IP"] = HEAD
    env["RAY_CLUSTER_NAME"] = "{field:metadata.labels['ray.io/cluster']}"
    env["RAY_CLOUD_INSTANCE_ID"] = "{field:metadata.name}"
    env["RAY_NODE_TYPE_NAME"] = "{field:metadata.labels['ray.io/group']}"
    env["KUBERAY_GEN_RAY_START_CMD"] = line
    env.setdefault("RAY_PORT", head_port)
    env.setdefault("RAY_ADDRESS", f"{'127.0.0.1' if node_type == 'head' else HEAD}:{head_port}")
    env.setdefault("RAY_USAGE_STATS_KUBERAY_IN_USE", "1")
    env.setdefault("RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "1")
    return ContainerCommand(_shell_split(line), env, _secret_files(container, pod.get("volumes", [])))


def kuberay_ray_start(params: Mapping[str, str], node_type: str, resources: Mapping[str, Any],
                      head_port: str = DEFAULT_GCS_PORT) -> list[str]:
    """`ray start` as KubeRay writes it for a head or worker pod, split as bash splits it."""
    return _shell_split(kuberay_ray_start_line(params, node_type, resources, head_port))


def kuberay_ray_start_line(params: Mapping[str, str], node_type: str, resources: Mapping[str, Any],
                           head_port: str = DEFAULT_GCS_PORT) -> str:
    """The `ray start` line KubeRay writes (the operator's rayStartParams completion and flag order)."""
    params = dict(params)
    if node_type == "worker":
        params.setdefault("address", f"{HEAD}:{head_port}")
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    cpu = limits.get("cpu") or requests.get("cpu")
    if "num-cpus" not in params and cpu is not None and quantity(cpu) > 0:
        params["num-cpus"] = str(math.ceil(quantity(cpu)))
    if "memory" not in params and quantity(limits.get("memory", 0)) > 0:
        params["memory"] = str(math.ceil(quantity(limits["memory"])))
    for key in sorted(limits):
        if "num-gpus" not in params and key.endswith("gpu") and quantity(limits[key]) > 0:
            params["num-gpus"] = str(math.ceil(quantity(limits[key])))
    flags = []
    for key in sorted(params):
        value = str(params[key])
        if value.lower() in ("true", "false") and key not in ("log-color", "include-dashboard"):
            flags += [f"--{key}"] if value.lower() == "true" else []
        else:
            flags.append(f"--{key}={value}")
    return " ".join(["ray", "start", *(["--head"] if node_type == "head" else []), *flags])


def _shell_split(line: str) -> list[str]:
    if "$" in line or "`" in line:
        raise ValueError(f"needs shell expansion, which this does not do: {line}")
    return shlex.split(line)


def quantity(value: str | float) -> Fraction:
    """A Kubernetes quantity ("500m", "8Gi", "1e3", 2) as a number."""
    text = str(value).strip()
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", text)
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = Fraction(match.group(1)), match.group(2) or ""
    scale = {"": Fraction(1), "m": Fraction(1, 1000)}
    scale |= {s: Fraction(1000) ** (i + 1) for i, s in enumerate("kMGTPE")}
    scale |= {f"{s}i": Fraction(1024) ** (i + 1) for i, s in enumerate("KMGTPE")}
    return number * scale[suffix]


def _env(container: Mapping[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in container.get("env", []):
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = str(var.get("value", ""))
        elif "fieldRef" in source:
            env[var["name"]] = f"{{field:{source['fieldRef']['fieldPath']}}}"
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = f"{{secret:{ref['name']}/{ref['key']}}}"
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = f"{{configmap:{ref['name']}/{ref['key']}}}"
        else:
            env[var["name"]] = f"{{resource:{source['resourceFieldRef']['resource']}}}"
    return env


def _secret_files(container: Mapping[str, Any], volumes: list[dict[str, Any]]) -> dict[str, str]:
    secrets = {v["name"]: v["secret"] for v in volumes if "secret" in v}
    files = {}
    for mount in container.get("volumeMounts", []):
        secret = secrets.get(mount["name"])
        if secret is None:
            continue
        for item in secret.get("items", []):
            files[f"{mount['mountPath']}/{item['path']}"] = f"{{secret:{secret['secretName']}/{item['key']}}}"
    return files
