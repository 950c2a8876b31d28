"""A real Redis Sentinel deployment on loopback: a master, two replicas, three sentinels.

All of them are ``redis-server`` processes started here (``--sentinel`` for the
sentinels), on free TCP ports, in a temp dir; ``kill_master()`` is a kill -9 of the
master's process. Two replicas, so that after a failover the new master still has a
replica and durable writes (WAIT 1) can still be confirmed.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import wait_until

MASTER_NAME = "soafmaster"
#: How long Sentinel waits before it calls an unanswering master down (milliseconds).
DOWN_AFTER_MS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sentinels:
    """The deployment; ``url`` is the ``redis+sentinel://`` URL that names it."""

    def __init__(self, directory: Path, binary: str) -> None:
        self.dir = directory
        self.binary = binary
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{self.ports[n]}" for n in ("s1", "s2", "s3"))
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def _server(self, name: str, *args: str) -> None:
        port = self.ports[name] = free_port()
        work = self.dir / name
        work.mkdir()
        self.procs[name] = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
             "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0",
             "--logfile", str(work / "redis.log"), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _sentinel(self, name: str) -> None:
        port = self.ports[name] = free_port()
        work = self.dir / name
        work.mkdir()
        conf = work / "sentinel.conf"  # Sentinel rewrites its file: it must be writable
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {work}\nlogfile {work / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.ports['master']} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
            f"sentinel parallel-syncs {MASTER_NAME} 2\n")
        self.procs[name] = subprocess.Popen([self.binary, str(conf), "--sentinel"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(self, name: str) -> redis.Redis:
        return redis.Redis(port=self.ports[name], socket_timeout=2)

    def start(self) -> None:
        self._server("master")
        for name in ("r1", "r2"):
            self._server(name, "--replicaof", "127.0.0.1", str(self.ports["master"]))
        for name in ("s1", "s2", "s3"):
            self._sentinel(name)
        for name in ("r1", "r2"):
            wait_until(lambda n=name: self._link_up(n), 30,  # type: ignore[misc]
                       message=f"replica {name} to sync with the master")
        for name in ("s1", "s2", "s3"):  # each knows both replicas and the two other sentinels
            wait_until(lambda n=name: self._sentinel_ready(n), 30,  # type: ignore[misc]
                       message=f"sentinel {name} to see the replicas and the other sentinels")

    def _link_up(self, name: str) -> bool:
        try:
            info = self.client(name).info("replication")
        except redis.RedisError:
            return False
        return info.get("master_link_status") == "up"

    def _sentinel_ready(self, name: str) -> bool:
        try:
            s = self.client(name)
            return (len(s.sentinel_slaves(MASTER_NAME)) == 2
                    and len(s.sentinel_sentinels(MASTER_NAME)) == 2)
        except redis.RedisError:
            return False

    def master_port(self) -> int:
        """The master's port as the sentinels see it now."""
        for name in ("s1", "s2", "s3"):
            try:
                return int(self.client(name).sentinel_get_master_addr_by_name(MASTER_NAME)[1])
            except (redis.RedisError, TypeError):
                continue
        raise AssertionError("no sentinel answers")

    def kill_master(self, *, freeze: bool = False) -> int:
        """kill -9 the master's process; return its port. ``freeze``: SIGSTOP it instead,
        which is what the loss of its host looks like to the others: its connections stay
        open and nothing answers on them (no reset, as a dead process's kernel sends)."""
        port = self.master_port()
        name = next(n for n, p in self.ports.items() if p == port)
        if freeze:
            self.procs[name].send_signal(signal.SIGSTOP)
        else:
            self.procs[name].kill()
            self.procs[name].wait(10)
        return port

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def sentinels(short_tmp: Path) -> Iterator[Sentinels]:
    from soaf.core.embedded import find_redis_server

    directory = short_tmp / f"sentinel-{free_port()}"
    directory.mkdir()
    deployment = Sentinels(directory, find_redis_server())
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()
