"""The wheel built from this tree works on its own: every subpackage and ``py.typed`` are
in it, it installs into a fresh virtualenv, and there (outside the repository) soaf
imports, its commands start and a template round-trips through ``dumps``/``loads``.

The fresh virtualenv gets only the wheel; the runtime dependencies come from the
environment running the tests (a ``.pth`` line appends its site-packages), so the test
needs no package index. That environment's own soaf (an editable install) stays out of
reach: paths appended by a ``.pth`` are not site directories, so its ``.pth`` hooks do
not run, and the wheel's soaf comes first on the path anyway.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What a wheel build never needs from the tree (caches, virtualenvs, build output).
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
    "__pycache__", "*.egg-info", "build", "dist", ".soaf", "work", "results",
)

SMOKE = textwrap.dedent('''
    import importlib, importlib.metadata, pkgutil, re, sys
    from pathlib import Path

    import soaf

    venv = Path(sys.argv[1]).resolve()
    where = Path(soaf.__file__).resolve()
    assert venv in where.parents, f"soaf imported from {where}, not from the wheel"
    assert (where.parent / "py.typed").is_file(), "py.typed is missing"

    names = []
    for info in pkgutil.walk_packages(soaf.__path__, "soaf."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # importing it runs the command
            importlib.import_module(info.name)
            names.append(info.name)
    for name in ("soaf.protocol", "soaf.process", "soaf.data", "soaf.plugin", "soaf.run",
                 "soaf.core.daemon", "soaf.client", "soaf.cli.main"):
        assert name in names, f"{name} was not found in the installed package"
    for name in soaf.__all__:
        getattr(soaf, name)

    # Every runtime dependency the wheel declares is installed (extras aside).
    for req in importlib.metadata.requires("soaf") or []:
        if "extra ==" not in req:
            importlib.metadata.distribution(re.split(r"[ ;<>=!~\\[(]", req, maxsplit=1)[0])

    secret = "packaging-test-secret-0123456789abcdef"
    template = soaf.ServiceParamTemplate(service="wordcount", args={"n": 3},
                                         output_files=["out.txt"])
    payload = soaf.dumps(template, secret)
    back = soaf.loads(payload, [secret])
    assert (back.service, back.service_id, back.args, back.output_files) == (
        "wordcount", template.service_id, {"n": 3}, ["out.txt"])
    try:
        soaf.loads(payload, ["another-secret-0123456789abcdefghijkl"])
    except soaf.SignatureError:
        pass
    else:
        raise AssertionError("a payload signed with another secret was accepted")
    print(f"smoke ok: {len(names)} modules")
''')


def can_build_in_place() -> bool:
    """Whether this environment's setuptools can build the wheel without fetching a newer
    one: >= 64 (pyproject's build requirement) with ``bdist_wheel`` (built in from 70.1,
    else from the ``wheel`` package)."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    if major < 64:
        return False
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def build_wheel(tmp: Path) -> Path:
    """A wheel of a copy of the tree (pip builds in the source directory, so not in ours)."""
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    isolation = ["--no-build-isolation"] if can_build_in_place() else []
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
         "-w", str(tmp / "dist"), str(src)])
    (wheel,) = (tmp / "dist").glob("soaf-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A virtualenv holding only ``wheel``; the dependencies come from this environment."""
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
         "--no-deps", "--no-index", str(wheel)])
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                    ).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "soaf-test-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return venv


def wheel_modules(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return {n for n in zf.namelist() if n.startswith("soaf/")}


@pytest.mark.slow
def test_the_wheel_installs_and_works_outside_the_tree(tmp_path):
    wheel = build_wheel(tmp_path)

    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "soaf").rglob("*")
               if p.is_file() and p.suffix in (".py", ".typed") and "__pycache__" not in p.parts}
    missing = in_tree - wheel_modules(wheel)
    assert not missing, f"the wheel lacks {sorted(missing)}: is every subpackage found?"

    venv = fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SOAF_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(elsewhere)  # no secret or .soaf/ found by accident
    python = str(venv / "bin" / "python")
    (elsewhere / "smoke.py").write_text(SMOKE)

    smoke = run([python, "smoke.py", str(venv)], cwd=elsewhere, env=env)
    assert "smoke ok" in smoke.stdout

    for cmd in ([str(venv / "bin" / "soaf"), "--help"], [python, "-m", "soaf.cli", "--help"]):
        shown = run(cmd, cwd=elsewhere, env=env)
        assert "Usage:" in shown.stdout and "submit" in shown.stdout, shown.stdout
