"""The architecture, checked: layers import only downward, no cycles, small modules.

Every import counts, at module level, inside functions and under ``TYPE_CHECKING``: an
import that only a type checker follows still ties one layer to another.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAF = ROOT / "soaf"

#: The layers, bottom up. A module may import its own layer and those below it.
LAYERS = ["errors", "protocol", "config", "process", "data", "plugin", "run", "metrics", "core",
          "client", "dashboard", "cli"]
#: What the client side (and ``import soaf``) must never load: the daemon, the run
#: machinery, processes and plugin loading.
CLIENT_NEVER = ("soaf.core", "soaf.run", "soaf.process", "soaf.plugin.loader",
                "soaf.plugin.importer", "soaf.plugin.reloader", "soaf.plugin.versions")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SOAF.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The soaf module ``name`` refers to (``soaf.x.y`` may be a name inside ``soaf.x``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def imports(module: str) -> frozenset[str]:
    """Every module ``module`` imports (soaf modules resolved, others by top name)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return scan(path.read_text(), module, package)


def scan(source: str, module: str, package: str) -> frozenset[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = resolve(f"{base}.{alias.name}") if base.startswith("soaf") else None
                if target is not None and target != base and target.startswith(base + "."):
                    found.add(target)  # ``from soaf.x import module``
                elif base.startswith("soaf"):
                    found.add(resolve(base) or base)
                else:
                    found.add(base.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found.add(resolve(alias.name) or alias.name.split(".")[0]
                          if alias.name.startswith("soaf") else alias.name.split(".")[0])
    found.discard(module)
    return frozenset(found)


def closure(module: str) -> set[str]:
    """Every module ``module`` imports, directly or not (third-party ones by top name)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in MODULES:
            todo.extend(imports(name))
    return seen - {module}


def layer(module: str) -> int | None:
    """The layer index of a soaf module (None for the ``soaf`` facade itself)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else None


def test_every_module_belongs_to_a_layer():
    for module in MODULES:
        parts = module.split(".")
        assert len(parts) == 1 or parts[1] in LAYERS, f"{module} is in no layer"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "soaf"])
def test_imports_point_down(module):
    own = layer(module)
    for target in imports(module):
        if not target.startswith("soaf"):
            continue
        assert target != "soaf", f"{module} imports the soaf facade; import the module itself"
        assert layer(target) <= own, f"{module} (layer {LAYERS[own]}) imports {target} above it"


def test_no_import_cycles():
    graph = {m: {t for t in imports(m) if t in MODULES} for m in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_protocol_imports_nothing_of_soaf_but_errors():
    for module in MODULES:
        if module.startswith("soaf.protocol"):
            outside = {t for t in imports(module) if t.startswith("soaf")
                       and not t.startswith("soaf.protocol")}
            assert outside <= {"soaf.errors"}, f"{module} imports {outside}"


@pytest.mark.parametrize("package", ["soaf.process", "soaf.data"])
def test_processes_and_data_know_no_redis(package):
    for module in MODULES:
        if module.startswith(package):
            assert "redis" not in closure(module), f"{module} reaches redis"


@pytest.mark.parametrize("module", [m for m in MODULES
                                    if m.startswith(("soaf.client", "soaf.dashboard"))])
def test_the_client_never_reaches_the_core(module):
    reached = {m for m in closure(module) if m.startswith(CLIENT_NEVER)}
    assert not reached, f"{module} reaches {sorted(reached)}"


def test_import_soaf_loads_no_core_module():
    code = "import sys, soaf; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT).stdout.split()
    assert [m for m in loaded if m.startswith(CLIENT_NEVER)] == []
    assert "soaf.client.sync" in loaded  # the scan above really saw soaf's modules


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by concept"


def test_the_scan_sees_imports_inside_functions_and_for_type_checking():
    source = ("from typing import TYPE_CHECKING\n"
              "def f():\n    from soaf.core.daemon import Core\n"
              "if TYPE_CHECKING:\n    from soaf.run import attempt\n"
              "from .follow import Follow\nimport soaf.data.workdir\n")
    found = scan(source, "soaf.client.x", "soaf.client")
    assert found >= {"soaf.core.daemon", "soaf.run.attempt", "soaf.client.follow",
                     "soaf.data.workdir", "typing"}


@pytest.mark.parametrize("package", ["handlers", "services", "tests/plugins/handlers",
                                     "tests/plugins/services"])
def test_plugins_import_only_the_public_api(package):
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("soaf"):
                assert node.module == "soaf", f"{path} imports {node.module}: use soaf's API"
                import soaf

                assert {a.name for a in node.names} <= set(soaf.__all__), path
            elif isinstance(node, ast.Import):
                assert all(a.name == "soaf" or not a.name.startswith("soaf")
                           for a in node.names), path
