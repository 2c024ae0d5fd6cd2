"""The import direction of docs/architecture.md, checked on the code: each package imports only
the layers below it, no two modules import each other (directly or around a circle), and the
package's names do not shadow its modules."""

from __future__ import annotations

import ast
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "lightnets"

#: Foundation modules: they import nothing of lightnets but each other.
FOUNDATION = {"errors", "checks", "registry", "files", "optional", "version"}
#: What each part may import (besides the foundation and itself); see docs/architecture.md.
ALLOWED = {
    "foundation": set(),
    "nn": set(),
    "data": set(),
    "models": {"nn"},
    "optim": {"nn"},
    "deploy": {"nn", "models"},
    "analysis": {"nn", "models", "deploy"},
    "engine": {"nn", "models", "optim", "data", "deploy"},
    "experiments": {"nn", "models", "optim", "data", "deploy", "analysis", "engine"},
    "commands": {"nn", "models", "optim", "data", "deploy", "analysis", "engine", "experiments"},
    "demo": {"nn", "models", "optim", "data", "deploy", "analysis", "engine"},
    "cli": {"*"},
    "__main__": {"*"},
    "__init__": {"*"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _part(module: str) -> str:
    """The layer a module belongs to: its subpackage, or foundation / cli / demo / ..."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    name = parts[1]
    return "foundation" if name in FOUNDATION else name


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """lightnets modules that `path` imports (resolved to modules, not names)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in MODULES and name.startswith("lightnets"):
                found.add(name)
    return found


def test_each_part_imports_only_the_layers_below_it():
    wrong = []
    for module, path in MODULES.items():
        part = _part(module)
        allowed = ALLOWED[part]
        if "*" in allowed:
            continue
        for target in _imports(path, top_level_only=False):
            tpart = _part(target)
            if target == "lightnets" or (tpart not in allowed | {"foundation", part}):
                wrong.append(f"{module} ({part}) imports {target} ({tpart})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    graph = defaultdict(set)
    for module, path in MODULES.items():
        for target in _imports(path, top_level_only=True):
            if target != module and not module.startswith(target + "."):
                graph[module].add(target)  # a package's __init__ imported by its own module
    # Tarjan's strongly connected components
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package and its own submodules are one unit (it re-exports them)
            if len({c for c in comp if not any(o.startswith(c + ".") for o in comp)}) > 1:
                cycles.append(sorted(comp))

    for v in list(MODULES):
        if v not in index:
            visit(v)
    assert not cycles, cycles


PACKAGES = sorted(m for m, p in MODULES.items() if p.name == "__init__.py")


@pytest.mark.parametrize("package", PACKAGES)
def test_no_name_in_a_package_shadows_one_of_its_modules(package):
    """`lightnets.analysis.profile` must be one thing: a function or a module, not both."""
    mod = importlib.import_module(package)
    for sub in (m for m in MODULES if m.rsplit(".", 1)[0] == package and m != package):
        name = sub.rsplit(".", 1)[1]
        value = getattr(mod, name, None)
        if value is not None:
            assert getattr(value, "__name__", None) == sub, (
                f"{package}.{name} is {value!r}, which hides the module {sub}"
            )
