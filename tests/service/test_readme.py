"""Every example in README.md that talks to `make serve`'s server runs as pasted against a real `pdserve serve`.

The examples are read out of the README itself: each fenced bash block that curls localhost:8000 and each
Python block, only with the HTTP port swapped for the test server's. A bash example passes when every
command exits 0 and prints no error object; a Python example when it exits 0.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import REPO, RunningServer, start_server

README = REPO / "README.md"
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)
SERVER = re.compile(r"(localhost|127\.0\.0\.1):8000")


def examples() -> list[tuple[str, str]]:
    """(language, code) of the README blocks that need the local server or run on their own."""
    found = []
    for lang, code in BLOCK.findall(README.read_text()):
        if lang == "bash" and not SERVER.search(code):
            continue  # set-up, docker, helm and kubectl commands: not for this machine
        if "kubectl" in code or "port-forward" in code:
            continue
        found.append((lang, code))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from services.modelgen.default_model import resolve_model

    running = start_server(tmp_path_factory.mktemp("readme"), resolve_model(None))
    yield running
    running.stop()


def test_the_readme_has_examples() -> None:
    langs = [lang for lang, _ in examples()]
    assert langs.count("bash") >= 2 and langs.count("python") >= 2, langs


@pytest.mark.parametrize("index", range(len(examples())))
def test_readme_example_runs_as_pasted(server: RunningServer, index: int, tmp_path: Path) -> None:
    lang, code = examples()[index]
    code = SERVER.sub(f"127.0.0.1:{server.http_port}", code)
    if lang == "python":
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, f"{code}\n---\n{done.stdout}\n{done.stderr}"
        return
    for command in _commands(code):
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command}\n---\n{done.stderr}"
        if done.stdout.strip().startswith("{"):
            assert "error" not in json.loads(done.stdout), f"{command}\n---\n{done.stdout}"


def _commands(code: str) -> list[str]:
    """The block's commands, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
