"""The package's shape: no import cycles (function-level imports included), and the data flows one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import retrieval

PACKAGE = Path(retrieval.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The package module an import names (a submodule or the package that defines the imported name)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at any depth of the file (top level or inside functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
            else:
                continue
            for candidate in candidates:
                target = _resolve(candidate, modules)
                if target and target != name and target.startswith("retrieval"):
                    targets.add(target)
                    break
        graph[name] = targets
    # a package's __init__ importing its own submodules is how packages work, not a cycle between layers
    return {m: {t for t in ts if not (t.startswith(m + ".") and files[m].name == "__init__.py")}
            for m, ts in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_only_import_downwards():
    graph = import_graph()
    # nothing below the workflows layer imports it, the CLI or the service
    top = {"retrieval.workflows", "retrieval.cli", "retrieval.serve", "retrieval.__main__"}
    for module, targets in graph.items():
        if any(module == t or module.startswith(t + ".") for t in top):
            continue
        upward = {t for t in targets if any(t == m or t.startswith(m + ".") for m in top)}
        assert not upward, f"{module} imports {sorted(upward)} from the layers above it"
    # the engine never calls the scoring, the index never scores
    assert "retrieval.metrics" not in graph["retrieval.knn"]
    assert "retrieval.metrics" not in graph["retrieval.index"]
    # Faiss's vocabulary knows nothing of our folders, items or towers
    assert graph["retrieval.faiss_tools"] <= {"retrieval.errors", "retrieval.fsutil"}


def test_help_imports_no_heavy_libraries():
    """`retrieval --help` stays fast: torch, Faiss and numpy are imported only when a command runs."""
    code = ("import sys; from retrieval.cli import app; "
            "print(','.join(m for m in ('torch', 'faiss', 'numpy', 'retrieval.workflows') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == ""
