"""A private redis-server for a bench: on a unix socket in a temp dir, nothing saved,
stopped and removed on exit. Imported by the bench scripts run from this directory."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from soaf.core.embedded import find_redis_server


@contextlib.contextmanager
def private_redis(prefix: str = "soaf-bench-") -> Iterator[tuple[Path, redis.Redis]]:
    """(temp dir, a client) of a fresh redis-server, answering PING, until the block ends."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    sock = tmp / "redis.sock"
    server = subprocess.Popen([find_redis_server(), "--port", "0", "--unixsocket", str(sock),
                               "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                              stdout=subprocess.DEVNULL)
    try:
        r = redis.Redis(unix_socket_path=str(sock))
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield tmp, r
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def plugin_dir(parent: Path, module: str, source: str) -> Path:
    """A plugins dir under ``parent`` (``services/`` and ``handlers/`` packages) whose
    ``services/<module>.py`` holds ``source``: what a bench's core loads."""
    plugins = parent / "plugins"
    for package in ("services", "handlers"):
        (plugins / package).mkdir(parents=True)
        (plugins / package / "__init__.py").write_text("")
    (plugins / "services" / f"{module}.py").write_text(source)
    return plugins
