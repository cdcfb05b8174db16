"""Static checks of deploy/docker/Dockerfile.{cpu,cuda}: no docker daemon needed.

Each Dockerfile is parsed into instructions. The tests check that every COPY source exists in the repository
(the build context is the repository root) and passes the Dockerfile's .dockerignore, that every pip pin is
pyproject.toml's, that the gRPC code is generated as `make proto` does, and that the image runs as a non-root
user with `pdserve` as its entrypoint.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
FLAVORS = ("cpu", "cuda")
PROTOC = (
    "python -m grpc_tools.protoc -Iproto --python_out=services/proto_gen --pyi_out=services/proto_gen "
    "--grpc_python_out=services/proto_gen proto/pdserve/v1/*.proto"
)
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


class Instruction(NamedTuple):
    keyword: str
    args: str


def parse(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, backslash continuations joined."""
    result: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.strip()[:-1].strip() + " "
            continue
        full = pending + line.strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return result


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    pins: dict[str, str] = {}
    for spec in specs:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", spec.strip())
        if match:
            pins[_normalize(match.group(1))] = match.group(3)
    return pins


class PipInstall(NamedTuple):
    requirements: list[str]
    index_url: str | None


def pip_installs(instructions: list[Instruction], args: dict[str, str]) -> list[PipInstall]:
    installs: list[PipInstall] = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for command in re.split(r"&&|;", _expand(ins.args, args)):
            tokens = shlex.split(command)
            if tokens[:2] != ["pip", "install"] and tokens[:4] != ["python", "-m", "pip", "install"]:
                continue
            tokens = tokens[2:] if tokens[0] == "pip" else tokens[4:]
            reqs: list[str] = []
            index_url = None
            i = 0
            while i < len(tokens):
                token = tokens[i]
                if token in ("--index-url", "-i", "--extra-index-url"):
                    assert token != "--extra-index-url", "an extra index lets pip pick another build"
                    index_url = tokens[i + 1]
                    i += 2
                    continue
                if token == "-e":
                    reqs.append(f"-e {tokens[i + 1]}")
                    i += 2
                    continue
                assert not token.startswith("-") or token in ("--no-cache-dir", "-q"), f"unexpected {token}"
                if not token.startswith("-"):
                    reqs.append(token)
                i += 1
            installs.append(PipInstall(reqs, index_url))
    return installs


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    found: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, default = ins.args.partition("=")
            found[name] = default
    return found


@pytest.fixture(params=FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _dockerfile(flavor: str) -> list[Instruction]:
    return parse(DOCKER / f"Dockerfile.{flavor}")


def _copy_sources(instructions: list[Instruction]) -> list[str]:
    sources: list[str] = []
    for ins in instructions:
        if ins.keyword == "ADD":
            pytest.fail(f"use COPY, not ADD: ADD {ins.args}")
        if ins.keyword != "COPY":
            continue
        parts = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
        flags = [p for p in parts if p.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [p for p in parts if not p.startswith("--")]
        assert len(paths) >= 2, f"COPY {ins.args}"
        sources += paths[:-1]
    return sources


def test_parse_joins_continuations(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text("# syntax=docker/dockerfile:1\nFROM x\nRUN a \\\n  # note\n  && b\ncopy a b\n")
    assert parse(path) == [Instruction("FROM", "x"), Instruction("RUN", "a && b"), Instruction("COPY", "a b")]


def test_copy_sources_exist(flavor: str) -> None:
    sources = _copy_sources(_dockerfile(flavor))
    assert "pyproject.toml" in sources
    missing = [s for s in sources if not list(REPO.glob(s.rstrip("/")))]
    assert not missing, f"Dockerfile.{flavor} copies paths that are not in the repository: {missing}"
    assert not [s for s in sources if s.rstrip("/") in (".", "*", ".venv")], "copy named paths only"


def test_dockerignore_lets_the_copied_paths_through(flavor: str) -> None:
    ignore = (DOCKER / f"Dockerfile.{flavor}.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: exclude everything, then re-include"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for source in _copy_sources(_dockerfile(flavor)):
        assert source.rstrip("/").split("/")[0] in included, f"{source} is excluded by the .dockerignore"
    assert "services/proto_gen/pdserve/" in patterns, "stale generated code must not enter the image"
    assert ".venv" not in included


def test_pip_pins_are_pyprojects(flavor: str) -> None:
    instructions = _dockerfile(flavor)
    pins = _pyproject_pins()
    installs = pip_installs(instructions, build_args(instructions))
    assert installs, "no pip install found"
    project = [n for n, inst in enumerate(installs) if "-e ." in inst.requirements or "." in inst.requirements]
    assert project, "the project itself (pyproject.toml) must be installed"
    torch = [n for n, inst in enumerate(installs) if any(r.startswith("torch==") for r in inst.requirements)]
    assert torch and torch[0] < project[0], "torch is installed first, from its own index"
    torch_index = installs[torch[0]].index_url
    if flavor == "cpu":
        assert torch_index == CPU_TORCH_INDEX
    else:
        assert torch_index and re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d+", torch_index)
    for inst in installs:
        assert inst.index_url is None or inst is installs[torch[0]], "only torch comes from another index"
        for req in inst.requirements:
            if req.startswith("-e ") or req == ".":
                continue
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", req)
            assert match, f"Dockerfile.{flavor}: {req!r} is not pinned with =="
            name = _normalize(match.group(1))
            assert name in pins, f"Dockerfile.{flavor}: {name} is not pinned in pyproject.toml"
            assert match.group(3) == pins[name], f"Dockerfile.{flavor}: {req} but pyproject pins {pins[name]}"
    names = {_normalize(r.split("[")[0].split("==")[0]) for inst in installs for r in inst.requirements}
    assert {"torch", "grpcio-tools", "ray"} <= names


def test_protos_generated_like_make_proto(flavor: str) -> None:
    runs = [ins.args for ins in _dockerfile(flavor) if ins.keyword == "RUN"]
    commands = [" ".join(c.split()) for run in runs for c in run.split("&&")]
    assert PROTOC in commands


def test_runs_as_non_root_with_pdserve_entrypoint(flavor: str) -> None:
    instructions = _dockerfile(flavor)
    users = [n for n, ins in enumerate(instructions) if ins.keyword == "USER"]
    assert users, "no USER"
    last_user = instructions[users[-1]].args
    uid = last_user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root uid, so runAsNonRoot can verify it"
    assert all(ins.keyword != "RUN" for ins in instructions[users[-1]:]), "nothing runs as root after USER"
    created = " ".join(ins.args for ins in instructions if ins.keyword == "RUN")
    assert re.search(rf"useradd[^&]*--uid {uid}\b", created), f"uid {uid} is never created"
    entrypoints = [ins.args for ins in instructions if ins.keyword == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["pdserve"]


def test_python_311_base(flavor: str) -> None:
    instructions = _dockerfile(flavor)
    args = build_args(instructions)
    (base,) = [_expand(ins.args, args) for ins in instructions if ins.keyword == "FROM"]
    if flavor == "cpu":
        assert base.startswith("python:3.11")
    else:
        assert base.startswith("nvidia/cuda:12.")
        assert "python3.11 -m venv" in " ".join(ins.args for ins in instructions if ins.keyword == "RUN")


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.args):
                name, sep, value = pair.partition("=")
                assert sep, f"ENV {ins.args}: write NAME=value"
                env[name] = value
    return env


def test_serve_listens_on_every_interface_in_the_image(flavor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker run -p ... IMAGE serve` is reachable: the image makes 0.0.0.0 the default of `pdserve serve --host`,
    while on a bare machine it stays 127.0.0.1."""
    import services.serve
    from services.cli import build_parser
    from services.env import Env

    instructions = _dockerfile(flavor)
    assert json.loads([ins.args for ins in instructions if ins.keyword == "CMD"][-1]) == ["serve"]
    image_host = _env(instructions).get("PDSERVE_HOST")
    assert image_host == "0.0.0.0"
    for host, expected in ((image_host, "0.0.0.0"), (None, "127.0.0.1")):
        if host is None:
            monkeypatch.delenv("PDSERVE_HOST", raising=False)
        else:
            monkeypatch.setenv("PDSERVE_HOST", host)
        monkeypatch.setattr(services.serve, "ENV", Env.read())  # what a process started with this env reads
        assert build_parser(["serve"]).parse_args(["serve"]).host == expected
        assert build_parser(["serve"]).parse_args(["serve", "--host", "10.0.0.7"]).host == "10.0.0.7"
