"""The import rules of DESIGN.md's "Layout", read from the import statements of every module under services/.

Only `import` and `from ... import` statements count (at any depth, unless a rule says module level), so a
module path written as a string (services/cli.py's command table) is not an import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"

# Engine modules that load torch (or the model) when imported; the router must not import them at module level.
TORCH_HEAVY_ENGINE = (
    "services.engine.engine",
    "services.engine.async_engine",
    "services.engine.model_runner",
    "services.engine.model_loader",
    "services.engine.models",
    "services.engine.sampler",
    "services.engine.cuda_graphs",
    "services.engine.llm",
    "services.engine.offline",
    "services.modelgen",
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. services.decode.worker
    target: str  # the imported module (or module.name for `from m import name`)
    line: int
    top_level: bool  # outside any function or class body

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}) imports {self.target}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SERVICES.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports_of(path: Path) -> list[Import]:
    module = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, child.lineno, top_level) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                source = _resolve(module, path.name == "__init__.py", child)
                found.extend(Import(module, f"{source}.{a.name}", child.lineno, top_level) for a in child.names)
            else:
                nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda)
                visit(child, top_level and not nested)

    visit(tree, True)
    return found


ALL_IMPORTS = [
    imp for path in sorted(SERVICES.rglob("*.py")) if "proto_gen" not in path.parts for imp in _imports_of(path)
]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(importer: str, forbidden: tuple[str, ...], top_level_only: bool = False) -> list[str]:
    return [
        str(imp)
        for imp in ALL_IMPORTS
        if _within(imp.module, importer)
        and any(_within(imp.target, f) for f in forbidden)
        and (imp.top_level or not top_level_only)
    ]


def test_the_scan_sees_the_known_imports() -> None:
    """Guards the parser itself: a rule checked against no imports cannot fail."""
    assert len({imp.module for imp in ALL_IMPORTS}) > 50
    pairs = {(imp.module, imp.target.rsplit(".", 1)[0]) for imp in ALL_IMPORTS}
    assert ("services.decode.worker", "services.worker.fingerprint") in pairs
    assert ("services.router.pool", "services.prefill.worker") in pairs


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("services.prefill", ("services.decode",)),
        ("services.decode", ("services.prefill",)),
        (
            "services.transfer",
            ("services.engine", "services.worker", "services.prefill", "services.decode", "services.router"),
        ),
        ("services.worker", ("services.prefill", "services.decode", "services.router")),
    ],
)
def test_layers_do_not_import_upward_or_sideways(importer: str, forbidden: tuple[str, ...]) -> None:
    bad = _violations(importer, forbidden)
    assert not bad, f"{importer} must not import {', '.join(forbidden)}:\n  " + "\n  ".join(bad)


def test_production_code_never_imports_bench() -> None:
    bad = [
        str(imp)
        for imp in ALL_IMPORTS
        if not _within(imp.module, "services.bench") and _within(imp.target, "services.bench")
    ]
    assert not bad, "only services.bench may import services.bench:\n  " + "\n  ".join(bad)


def test_router_does_not_load_torch_heavy_engine_modules_at_import() -> None:
    bad = _violations("services.router", TORCH_HEAVY_ENGINE, top_level_only=True)
    assert not bad, "services.router imports torch-heavy engine modules at module level:\n  " + "\n  ".join(bad)


def test_what_the_router_shares_with_the_workers_loads_no_torch() -> None:
    """The router imports validation and messages: importing them, and all they import, leaves torch unloaded."""
    code = (
        "import sys, services.worker.validation, services.worker.messages; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'services.engine.engine'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=SERVICES.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing services.worker.validation/messages loaded {out.stdout.strip()}"
