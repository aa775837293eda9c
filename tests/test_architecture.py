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


# -- size and naming limits: a newcomer can read a module, call a function and trust an underscore ----------------
MAX_MODULE_LINES = 500
MAX_PARAMETERS = 12


def _package_files() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_typer_command(node: ast.AST) -> bool:
    """A function registered with typer (`@app.command(...)`, `@app.callback(...)`): one parameter per option."""
    for decorator in getattr(node, "decorator_list", []):
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr in ("command", "callback"):
            return True
    return False


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return [n for n in names if n not in ("self", "cls")]


def test_no_module_is_over_500_lines():
    long = {name: n for name, path in _package_files().items()
            if (n := len(path.read_text("utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concept): {long}"


def test_no_function_takes_more_than_12_parameters_outside_typer_commands():
    many = []
    for name, path in _package_files().items():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_typer_command(node):
                if len(_parameters(node)) > MAX_PARAMETERS:
                    many.append(f"{name}.{node.name} ({len(_parameters(node))})")
    assert not many, f"functions over {MAX_PARAMETERS} parameters (pass a built object instead): {many}"


def private_imports() -> list[str]:
    """`from retrieval.x import _name` and `x._name` (x an imported package module) in another package module."""
    files = _package_files()
    modules = set(files)
    found = []
    for name, path in files.items():
        tree = ast.parse(path.read_text("utf-8"))
        aliases = {}  # local name -> package module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("retrieval"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{name} imports {node.module}.{alias.name}")
                    if f"{node.module}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != name):
                found.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


def test_no_private_name_is_used_across_modules():
    assert not private_imports(), "private names used outside their module (give them a public name): " \
                                  f"{private_imports()}"


def test_the_limit_checks_see_what_they_look_for(tmp_path):
    """The checks above parse real code: a 13-parameter function, a typer command and a private import."""
    tree = ast.parse("import typer\napp = typer.Typer()\n"
                     "def f(a, b, c, d, e, f, g, h, i, j, k, l, m): pass\n"
                     "@app.command('x')\ndef g(a, b, c, d, e, f, g, h, i, j, k, l, m): pass\n")
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert [len(_parameters(n)) for n in functions] == [13, 13]
    assert [_is_typer_command(n) for n in functions] == [False, True]
