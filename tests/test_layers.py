"""The package's shape: no module imports names from the package top, and module-level imports form
no cycle (imports inside functions, which run later, are the sanctioned way to reach upwards)."""

from __future__ import annotations

import ast
from pathlib import Path

import ebood

ROOT = Path(ebood.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["ebood", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(path) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) of the imports that run when ``module`` is imported."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.If, ast.Try)):  # version / optional-dependency guards run at import
            todo += node.body + node.orelse + getattr(node, "handlers", []) + getattr(node, "finalbody", [])
            for h in getattr(node, "handlers", []):
                todo += h.body
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((_resolve(module, path, node), [a.name for a in node.names], node.lineno))
    return found


def _edges(module: str, path: Path) -> set[str]:
    out = set()
    for target, names, _ in _top_level_imports(module, path):
        if not target.startswith("ebood"):
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        out.update(subs if subs and len(subs) == len(names) else [target, *subs])
    out.discard(module)
    return out


def test_nothing_below_the_top_imports_names_from_it():
    top_level_names = set(ebood.__all__) - {m.split(".")[1] for m in MODULES if m.count(".") == 1}
    offenders = []
    for module, path in MODULES.items():
        if module == "ebood":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve(module, path, node) == "ebood":
                bad = [a.name for a in node.names if a.name in top_level_names or f"ebood.{a.name}" not in MODULES]
                if bad:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {bad} from the package top")
    assert not offenders, "\n".join(offenders)


def test_module_level_imports_have_no_cycle():
    graph = {m: _edges(m, p) for m, p in MODULES.items()}
    # a package imports its own submodules to re-export them; a submodule importing its package's
    # __init__ is what makes a cycle, so edges from a package to its children are kept
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # importing a package's own submodule from inside another submodule goes through the package's
    # __init__; only cycles that do not pass through a package __init__ are real module cycles
    real = [c for c in cycles if not any(_is_package(MODULES[m]) for m in c[:-1])]
    assert not real, "\n".join(" -> ".join(c) for c in real)
