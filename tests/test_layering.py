"""Dependencies point one way: checked by reading the imports of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAF = ROOT / "soaf"

#: Modules a client process loads must not pull in the core or its engines.
CORE_ONLY = {"soaf.core", "soaf.lifecycle", "soaf.runner", "soaf.plugins", "soaf.watcher",
             "soaf.writer", "soaf.intake", "soaf.embedded", "soaf.importer", "soaf.reloader",
             "soaf.versions"}
CLIENT_SIDE = ["client", "aio", "pipeline"]
#: Low layers import nothing of soaf above them.
LOW = {
    "errors": set(),
    "keys": set(),
    "codec": {"soaf.errors", "soaf.config", "soaf.unpickler"},
    "unpickler": {"soaf.errors"},
    "connection": {"soaf.errors"},
}


def soaf_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "soaf":
                found.update(f"soaf.{a.name}" for a in node.names)
            elif node.module.startswith("soaf."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("soaf"))
    return found


def closure(module: str) -> set[str]:
    """Every soaf module ``module`` imports, directly or not."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = SOAF / (name.split(".", 1)[1] + ".py")
        if name in seen or not path.exists():
            continue
        seen.add(name)
        todo.extend(soaf_imports(path))
    return seen - {module}


@pytest.mark.parametrize("name", [m for m in CLIENT_SIDE if (SOAF / f"{m}.py").exists()])
def test_client_side_never_imports_the_core(name):
    assert not closure(f"soaf.{name}") & CORE_ONLY


@pytest.mark.parametrize("name", sorted(LOW))
def test_low_layers_import_nothing_above(name):
    assert soaf_imports(SOAF / f"{name}.py") <= LOW[name]


def test_runner_knows_no_redis():
    text = (SOAF / "runner.py").read_text()
    assert "import redis" not in text and "soaf.state" not in text


@pytest.mark.parametrize("package", ["handlers", "services", "tests/plugins/handlers",
                                     "tests/plugins/services"])
def test_plugins_import_only_the_public_api(package):
    import soaf

    public = {f"soaf.{name}" for name in soaf.__all__}
    for path in (ROOT / package).rglob("*.py"):
        assert soaf_imports(path) <= public, f"{path} imports soaf internals"
