"""Size and shape limits of the code under services/ and kernels/, read with ast (nothing is imported).

- no file under services/ longer than MAX_FILE_LINES (generated proto_gen excluded)
- no function under services/ longer than MAX_FUNCTION_LINES, methods and nested functions included
- no import cycle among the modules of services/ and kernels/, counting every import statement at any
  depth: module level, inside functions, and under `if TYPE_CHECKING:`
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "kernels")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "proto_gen" not in p.parts)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass(frozen=True)
class Edge:
    """`source` imports `target` (both module names of this repository) at `line`."""

    source: str
    target: str
    line: int


def _from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join(parts + ([node.module] if node.module else []))


def _edges_of(path: Path, source: str, modules: set[str]) -> set[Edge]:
    """One edge per imported module of this repository: `import a.b` is an edge to a.b, and
    `from a import b` one to a.b when that is a module, else to a (b is a name a defines).
    The package `a`, whose __init__ Python runs before a.b, gets no edge of its own."""
    targets: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(source, path.name == "__init__.py", node)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                targets.add((name if name in modules else base, node.lineno))
    return {Edge(source, t, line) for t, line in targets if t in modules and t != source}


def _import_edges() -> tuple[set[str], list[Edge]]:
    """The modules of services/ and kernels/, and every import of one of them by another."""
    paths = [p for package in PACKAGES for p in _sources(package)]
    modules = {_module_name(p) for p in paths}
    edges = {e for p in paths for e in _edges_of(p, _module_name(p), modules)}
    return modules, sorted(edges, key=lambda e: (e.source, e.target, e.line))


def _cycles(modules: set[str], edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def _describe(component: list[str], edges: list[Edge]) -> str:
    members = set(component)
    inner = [f"    {e.source}:{e.line} -> {e.target}" for e in edges if e.source in members and e.target in members]
    return " <-> ".join(component) + "\n" + "\n".join(inner)


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = (node.end_lineno or node.lineno) - start + 1
            if length > MAX_FUNCTION_LINES:
                out.append(f"{_rel(path)}:{node.lineno} {node.name}() is {length} lines")
    return out


def test_the_import_scan_sees_known_edges() -> None:
    """Guards the scanner: a cycle check over an empty graph cannot fail."""
    modules, edges = _import_edges()
    assert len(modules) > 50
    pairs = {(e.source, e.target) for e in edges}
    assert ("services.decode.worker", "services.worker.fingerprint") in pairs
    assert ("services.router.pool", "services.prefill.worker") in pairs
    assert ("services.engine", "services.engine.llm") in pairs  # a function-level and a TYPE_CHECKING import


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = [Edge("a", "b", 1), Edge("b", "c", 1), Edge("c", "a", 1), Edge("c", "d", 1)]
    assert _cycles({"a", "b", "c", "d"}, edges) == [["a", "b", "c"]]


def test_no_file_is_too_long() -> None:
    bad = [
        f"{_rel(p)} is {n} lines"
        for p in _sources("services")
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not bad, f"files under services/ over {MAX_FILE_LINES} lines:\n  " + "\n  ".join(bad)


def test_no_function_is_too_long() -> None:
    bad = [line for p in _sources("services") for line in _long_functions(p)]
    assert not bad, f"functions under services/ over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(bad)


def test_no_import_cycles() -> None:
    modules, edges = _import_edges()
    cycles = _cycles(modules, edges)
    assert not cycles, "import cycles (put the shared names in a leaf module):\n  " + "\n  ".join(
        _describe(c, edges) for c in cycles
    )


def test_the_readme_layout_table_matches_the_tree() -> None:
    """Every path the README's layout table names exists, and every package and module of services/ is named."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout\n") : readme.index("\n## ", readme.index("## Layout\n") + 1)]
    named = {path.rstrip("/") for row in table.splitlines() if row.startswith("| `")
             for path in _backquoted(row.split(" | ")[0])}
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"the layout table names paths that do not exist: {missing}"
    entries = [p for p in (ROOT / "services").iterdir()
               if p.name not in ("__init__.py", "__pycache__", "proto_gen") and (p.is_dir() or p.suffix == ".py")]
    unnamed = sorted(_rel(p) for p in entries if _rel(p) not in named and _rel(p) not in readme)
    assert not unnamed, f"parts of services/ the layout table does not mention: {unnamed}"


def _backquoted(cell: str) -> list[str]:
    return [part for i, part in enumerate(cell.split("`")) if i % 2 == 1]
