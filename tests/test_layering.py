"""The layering that docs/design.md promises: the core (the prefix mechanism, decoding, baselines, backbones, data,
evaluation, the scorer's entry point) imports neither Lightning nor Hydra, and the package has no import cycle, not
even one dodged by an import inside a function. Each check runs in a fresh interpreter or reads the source."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.helpers.cli import run_python
from tests.helpers.config import REPO

PACKAGE = REPO / "prefix_lightning"
CORE = [
    "prefix_lightning",
    "prefix_lightning.prefix",
    "prefix_lightning.decoding",
    "prefix_lightning.baselines",
    "prefix_lightning.backbones",
    "prefix_lightning.data",
    "prefix_lightning.evaluation",
    "prefix_lightning.score",
]
FRAMEWORKS = ("lightning", "lightning_fabric", "pytorch_lightning", "hydra", "omegaconf")


def package_modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its ``__init__.py``), found without importing."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


# Run by a fresh interpreter: import the core alone and note which frameworks came with it; then import each module
# of the package first, with none of the package's other modules loaded (a cycle breaks in some order).
FRESH_IMPORTS = """
import importlib, json, sys, traceback
import {core}
frameworks = sorted({{name.split(".")[0] for name in sys.modules}} & {frameworks!r})
failures = []
for name in {modules!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] == "prefix_lightning"]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures.append(name + ": " + traceback.format_exc().splitlines()[-1])
print(json.dumps({{"frameworks": frameworks, "failures": failures}}))
"""


@pytest.fixture(scope="module")
def fresh_imports() -> dict[str, list[str]]:
    code = FRESH_IMPORTS.format(core=", ".join(CORE), frameworks=set(FRAMEWORKS), modules=sorted(package_modules()))
    result = run_python("-c", code, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.integration  # a fresh interpreter imports the whole package (20 s)
def test_the_core_imports_neither_lightning_nor_hydra(fresh_imports: dict[str, list[str]]) -> None:
    assert fresh_imports["frameworks"] == [], "the core must stay usable in a plain PyTorch loop"


@pytest.mark.integration  # a fresh interpreter imports the whole package (20 s)
def test_every_module_imports_first_and_alone(fresh_imports: dict[str, list[str]]) -> None:
    assert fresh_imports["failures"] == []


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` folders up
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name c in a.b: the module a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycle_in_the_source() -> None:
    modules = package_modules()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    cycles, state, trail = [], {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        trail.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target)
        trail.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert graph["prefix_lightning.training.train"], "the import graph must see the package's own imports"
    assert cycles == []
