"""Shared fixtures: a real redis-server per test session, real core processes, clients.

Nothing here mocks Redis: the session starts its own redis-server on a unix socket in a
temp dir (so tests can stop, kill and restart it) and every test gets its own key
prefix. Cores run as real ``start_core.py`` processes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
SECRET = "test-secret-" + "x" * 20


def stream_events(r: redis.Redis, key: str) -> list[dict[str, Any]]:
    """Every event in the event stream ``key``, in order (several may share an entry)."""
    from soaf.protocol.state import decode_events

    return [event for _, data in r.xrange(key) for event in decode_events(data)]


def until_waiting(client: Any, timeout: float = 10.0) -> None:
    """Until a ``wait`` under way in another thread of ``client`` has read the records: only
    then does it ride out a Redis outage (one that has read nothing yet fails at once, so
    that a wrong URL does not hang a client)."""
    wait_until(lambda: any(w.read for w in client._listener.board.waits), timeout,
               message="the wait's first read")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


class RedisServer:
    """A private redis-server on a unix socket that tests may stop, kill and restart."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.dir = directory
        self.sock = directory / "redis.sock"
        self.url = f"unix://{self.sock}"
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        from soaf.core.embedded import find_redis_server
        from soaf.errors import EmbeddedRedisError

        try:
            self.binary = find_redis_server()
        except EmbeddedRedisError as e:
            pytest.fail(f"the tests need a redis-server: {e}")

    def start(self) -> None:
        args = [self.binary, "--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm",
                "700", "--dir", str(self.dir), "--save", "", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log"),
                "--appendonly", "yes" if self.appendonly else "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=str(self.sock))
        wait_until(lambda: self._ping(client), 10, message="redis-server to answer")
        client.close()

    @staticmethod
    def _ping(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.sock))


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    """A short temp dir (unix socket paths must stay under ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="soaf-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(short_tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(short_tmp / "shared")
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(short_tmp: Path) -> Iterator[RedisServer]:
    """A redis-server for one test alone (for tests that stop or kill it)."""
    directory = short_tmp / uuid.uuid4().hex[:8]
    directory.mkdir()
    server = RedisServer(directory, appendonly=True)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


def _work_base() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


@pytest.fixture
def work_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="soaf-work-", dir=_work_base()))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """A private copy of tests/plugins (handlers/, services/) plus tests/programs."""
    target = tmp_path / "plugins"
    shutil.copytree(TESTS / "plugins", target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(TESTS / "programs", target / "programs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture
def core_env(redis_server: RedisServer, prefix: str, work_root: Path, plugin_dir: Path,
             tmp_path: Path) -> dict[str, str]:
    """Environment for a core process (and for client scripts run as subprocesses)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOAF_")}
    env.update({
        "SOAF_REDIS_URL": redis_server.url,
        "SOAF_SECRET": SECRET,
        "SOAF_PREFIX": prefix,
        "SOAF_NODE": "core-a",
        "SOAF_WORK_ROOT": str(work_root),
        "SOAF_PLUGINS": str(plugin_dir),
        "SOAF_STATE_DIR": str(tmp_path / "state"),
        "SOAF_HEARTBEAT_INTERVAL": "0.5",
        "SOAF_HEARTBEAT_TTL": "3",
        "SOAF_KILL_GRACE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


class CoreProcess:
    """A real ``start_core.py`` process with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, args: list[str] | None = None) -> None:
        self.env = env
        self.log_path = log_path
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        return self.env.get("SOAF_NODE", "")

    def start(self, *, wait_ready: bool = True) -> CoreProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "start_core.py"), "-v", *self.args],
                cwd=str(ROOT), env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        if wait_ready:
            wait_until(lambda: "ready" in self.log() or self.proc.poll() is not None, 20,
                       message="the core to be ready")
            if self.proc.poll() is not None:
                raise AssertionError(f"core exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def start_core(core_env: dict[str, str], tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[Callable[..., CoreProcess]]:
    """Start cores: ``start_core()`` or ``start_core(SOAF_NODE='b', args=[...])``."""
    cores: list[CoreProcess] = []

    def start(args: list[str] | None = None, wait_ready: bool = True,
              **env_overrides: str) -> CoreProcess:
        env = {**core_env, **env_overrides}
        core = CoreProcess(env, tmp_path / f"core-{len(cores)}.log", args)
        cores.append(core)
        return core.start(wait_ready=wait_ready)

    yield start
    for core in cores:
        if core.alive():
            core.signal(signal.SIGTERM)
            try:
                core.proc.wait(3)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                core.signal(signal.SIGTERM)  # a second signal stops running services
                try:
                    core.proc.wait(15)  # type: ignore[union-attr]
                except subprocess.TimeoutExpired:
                    core.kill()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for core in cores:
            sys.stderr.write(f"\n----- log of core {core.node} -----\n{core.log()[-6000:]}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


@pytest.fixture
def client(redis_server: RedisServer, prefix: str) -> Iterator[Any]:
    from soaf import Client

    c = Client(redis_server.url, secret=SECRET, prefix=prefix)
    yield c
    c.close()


def crash(core, client, ids: list[str]) -> None:
    """kill -9 a core, its spawner and the process groups of its programs: what a machine
    crash does (no program is left to adopt, no exit status is written)."""
    from soaf.process.lineage import direct_children

    for child in direct_children(core.proc.pid):  # its spawner first: it writes exit files
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    groups = []
    for sid in ids:
        record = client.status(sid)
        pid = record.get("shim_pid") or record.get("pid")
        if pid:
            try:
                groups.append(os.getpgid(pid))
            except ProcessLookupError:
                pass
    core.kill()
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
