"""The import policy: no module imports, at any depth or inside a function, a module that imports it back, and the
CLI's front door stays light (`tunesmith --help` loads no torch, transformers or fastapi).

Imports sit at the top of a module, except where they keep a light module light: the CLI, config, files, the run
directory and the UI's pages import heavy packages inside the function that needs them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tunesmith

SOURCE = Path(tunesmith.__file__).parent
HEAVY = ("torch", "transformers", "fastapi", "peft", "accelerate", "datasets", "scipy")


def _modules() -> dict[str, Path]:
    found = {}
    for path in SOURCE.rglob("*.py"):
        parts = ("tunesmith", *path.relative_to(SOURCE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    """The tunesmith modules one import statement names (a `from package import submodule` names both)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    submodules = {f"{base}.{alias.name}" for alias in node.names} & set(known)
    # `from package import submodule` needs only the submodule; a name defined in the package needs the package.
    names_in_base = any(f"{base}.{alias.name}" not in known for alias in node.names)
    return submodules | ({base} if names_in_base and base in known else set())


def import_graph() -> dict[str, set[str]]:
    """module -> the tunesmith modules it imports anywhere in its text (top level, functions, TYPE_CHECKING)."""
    known = _modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[module] |= _imported(module, path, node, known) - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_among_the_modules():
    graph = import_graph()
    found = cycles(graph)
    shown = [
        " <-> ".join(c) + "\n    " + "\n    ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found
    ]
    assert found == [], "import cycles (in-function imports count):\n" + "\n".join(shown)


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_cli_and_its_help_load_nothing_heavy():
    code = (
        "import sys, contextlib, io\n"
        "import tunesmith.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    tunesmith.cli.main(['--help'])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
