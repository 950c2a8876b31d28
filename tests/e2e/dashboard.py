"""A real ``soaf dashboard`` process for the dashboard tests, on a free port."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_until

TOKEN = "dashboard-test-token-0123456789"


class DashboardProcess:
    """``soaf dashboard --port 0``: uvicorn logs the port it was given."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.url = ""
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "soaf.cli", "dashboard", "--port", "0"],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.ready, 30, message=f"the dashboard to answer:\n{self.log()}")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the dashboard exited with {self.proc.returncode}:\n{self.log()}")
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", self.log())
        if found is None:
            return False
        self.url = found.group(1)
        try:
            return httpx.get(self.url + "/api/nodes", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def dashboard(core_env, tmp_path) -> Iterator[DashboardProcess]:
    env = {**core_env, "SOAF_DASHBOARD_TOKEN": TOKEN}
    process = DashboardProcess(env, tmp_path / "dashboard.log")
    yield process
    process.stop()


@pytest.fixture
def api(dashboard) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=dashboard.url, timeout=20) as client:
        yield client


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
