"""PluginLoader in this process: generations, fresh source, failures that keep the last good one."""

from __future__ import annotations

import os
import re
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from soaf.errors import PluginError
from soaf.plugin.loader import PACKAGES, PluginLoader, content_digest, is_source
from tests.conftest import wait_until

PROGRAM = """
from soaf import ServiceProgramTemplate

VALUE = {value!r}

class Program(ServiceProgramTemplate):
    name = {name!r}
    value = VALUE

    def command(self):
        return ["true"]
"""


def _plugin_modules() -> list[str]:
    return [n for n in sys.modules if n.partition(".")[0] in PACKAGES]


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """An empty plugin root; the plugin modules are taken out of this process afterwards."""
    base = tmp_path / "plugins"
    for package in PACKAGES:
        (base / package).mkdir(parents=True)
        (base / package / "__init__.py").write_text("")
    yield base
    for name in _plugin_modules():
        del sys.modules[name]
    while str(base.resolve()) in sys.path:
        sys.path.remove(str(base.resolve()))


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_generations_are_numbered_and_rebuilt(root):
    write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    loader = PluginLoader(root)
    first = loader.load()
    write(root, "services/b.py", PROGRAM.format(name="b", value=2))
    second = loader.load()
    assert (first.number, second.number) == (1, 2)
    assert sorted(first.programs) == ["a"] and sorted(second.programs) == ["a", "b"]
    # Module-level state is rebuilt: a new class object, from a new module object.
    assert second.programs["a"] is not first.programs["a"]
    assert sys.modules["services.a"] is second.modules["services.a"]
    assert second.version == f"2-{content_digest(root)[:8]}"


def test_same_size_edit_in_the_same_second_is_not_served_from_bytecode(root, monkeypatch):
    """Python trusts __pycache__ when the source's mtime (whole seconds) and size match."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as on most machines
    path = write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    stamp = path.stat()
    loader = PluginLoader(root)
    assert loader.load().programs["a"].value == 1
    write(root, "services/a.py", PROGRAM.format(name="a", value=2))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size
    assert loader.load().programs["a"].value == 2
    assert not (root / "services" / "__pycache__").exists()


def test_numbers_come_from_the_given_counter(root):
    write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    seen = []

    def numbers(last: int) -> int:
        seen.append(last)
        return 40 + last

    loader = PluginLoader(root, numbers=numbers)
    assert loader.load().number == 40
    assert loader.load().number == 80
    assert seen == [0, 40]


BROKEN = {
    "syntax": ("services/bad.py", "x = 1\ndef broken(:\n    pass\n", 2, "SyntaxError"),
    "import": ("services/bad.py", "import os\nimport no_such_module_xyz\n", 2,
               "ModuleNotFoundError"),
    "exception": ("services/bad.py", "x = 1\n\nraise RuntimeError('boom at import')\n", 3,
                  "boom at import"),
    "sys.exit": ("services/bad.py", "import sys\nsys.exit(3)\n", 2, "sys.exit(3)"),
    "duplicate": ("services/bad.py",
                  "from soaf import ServiceProgramTemplate\n\n\nclass Again(ServiceProgramTemplate):"
                  "\n    name = 'a'\n", 4, "claimed twice"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_failed_load_keeps_the_last_good_generation(root, kind):
    write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    loader = PluginLoader(root)
    good = loader.load()
    rel, text, line, words = BROKEN[kind]
    bad = write(root, rel, text)
    with pytest.raises(PluginError, match=re.escape(words)):
        loader.load()
    assert loader.current is good
    assert loader.error is not None and loader.error.file == str(bad) and loader.error.line == line
    assert f"{bad}:{line}" in loader.error.text
    # The last good generation's modules are back, for lazy imports in callbacks.
    assert sys.modules["services.a"] is good.modules["services.a"]
    assert "services.bad" not in sys.modules
    bad.unlink()
    fixed = loader.load()
    assert loader.error is None and fixed.number == 2


def test_a_hung_import_is_abandoned_and_cannot_come_back(root, tmp_path):
    gate = tmp_path / "gate"
    write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    loader = PluginLoader(root)
    good = loader.load()
    write(root, "services/hang.py", f"""\
        import pathlib, time
        while not pathlib.Path({str(gate)!r}).exists():
            time.sleep(0.01)
        import services.late
        """)
    with pytest.raises(PluginError, match=r"did not finish within 0\.5 s"):
        loader.load(timeout=0.5)
    assert loader.current is good
    assert loader.error.file == str(root / "services" / "hang.py") and loader.error.line == 3
    assert sys.modules["services.a"] is good.modules["services.a"]
    # The hung thread still holds the import lock of services.hang: a fixed file with
    # that name must load all the same.
    write(root, "services/hang.py", PROGRAM.format(name="hang", value="fixed"))
    fixed = loader.load(timeout=10)
    assert fixed.programs["hang"].value == "fixed" and loader.error is None
    # Let the abandoned import run on: it must change nothing, and not even run a module
    # that is new since the last load.
    ran = tmp_path / "late-ran"
    write(root, "services/late.py", f"open({str(ran)!r}, 'w').close()\n")
    gate.touch()
    wait_until(lambda: not any(t.name == "soaf-plugin-import" for t in threading.enumerate()),
               10, message="the abandoned import to end")
    assert loader.current is fixed and not ran.exists()
    for name, module in fixed.modules.items():
        assert sys.modules[name] is module, name
    assert set(_plugin_modules()) == set(fixed.modules)


def test_helper_modules_and_subpackages_are_reloaded(root):
    write(root, "services/helpers/__init__.py", "")
    write(root, "services/helpers/words.py", "WORD = 'hello'\n")
    write(root, "services/greet.py", """\
        from soaf import ServiceProgramTemplate
        from services.helpers.words import WORD

        class Greet(ServiceProgramTemplate):
            name = "greet"
            word = WORD
        """)
    loader = PluginLoader(root)
    assert loader.load().programs["greet"].word == "hello"
    write(root, "services/helpers/words.py", "WORD = 'bonjour'\n")
    assert loader.load().programs["greet"].word == "bonjour"
    (root / "services" / "greet.py").unlink()
    assert "greet" not in loader.load().programs
    assert "services.greet" not in sys.modules


@pytest.mark.parametrize(("rel", "expected"), [
    ("services/a.py", True),
    ("handlers/sub/b.py", True),
    ("services/sub", True),
    ("services/__pycache__/a.cpython-311.pyc", False),
    ("services/.#a.py", False),
    ("services/.a.py.swp", False),
    ("services/.hidden/a.py", False),
    ("programs/a.py", False),
    ("a.py", False),
])
def test_what_counts_as_plugin_source(rel, expected):
    assert is_source(Path(rel)) is expected


def test_editor_files_are_not_imported(root):
    write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    write(root, "services/.#a.py", "this is an editor lock file, not Python")
    loader = PluginLoader(root)
    assert sorted(loader.load().programs) == ["a"]
