"""Durable writes against a real master and a replica that joins late: a durable submit
and a core's final state count only once a replica holds them; until then the submit
raises NotReplicated and the writer keeps the final state and sends it again."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from soaf import Client, ServiceParamTemplate
from soaf.core.writer import StateWriter
from soaf.errors import ConfigError, DuplicateService, NotReplicated
from soaf.protocol import durable
from soaf.protocol.connection import connect
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.state import Change
from tests.conftest import ROOT, SECRET, wait_until
from tests.sentinels import free_port


class Pair:
    """A master, and a replica started on demand (``join()``)."""

    def __init__(self, directory: Path, binary: str) -> None:
        self.dir, self.binary = directory, binary
        self.procs: list[subprocess.Popen[bytes]] = []
        self.master = self._start("master")
        self.replica = 0

    def _start(self, name: str, *args: str) -> int:
        """A redis-server on a TCP port and on the unix socket ``<dir>/<name>.sock``."""
        port = free_port()
        (self.dir / name).mkdir()
        self.procs.append(subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--unixsocket", str(self.dir / f"{name}.sock"), "--unixsocketperm", "700",
             "--dir", str(self.dir / name), "--repl-diskless-sync-delay", "0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        r = redis.Redis(port=port)
        wait_until(lambda: _ping(r), 10, message=f"{name} to answer")
        return port

    def join(self, name: str = "replica", of: int | None = None) -> redis.Redis:
        port = self._start(name, "--replicaof", "127.0.0.1", str(of or self.master))
        self.replica = self.replica or port
        r = redis.Redis(port=port)
        wait_until(lambda: r.info("replication").get("master_link_status") == "up", 30,
                   message=f"{name} to sync")
        return r

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.master}"


def _ping(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def pair(short_tmp: Path) -> Iterator[Pair]:
    from soaf.core.embedded import find_redis_server

    directory = short_tmp / f"pair-{free_port()}"
    directory.mkdir()
    p = Pair(directory, find_redis_server())
    yield p
    for proc in p.procs:
        proc.kill()
        proc.wait(10)


def test_a_durable_submit_returns_once_a_replica_holds_it(pair: Pair, prefix: str) -> None:
    template = ServiceParamTemplate("steps")
    with Client(pair.url, secret=SECRET, prefix=prefix) as client:
        with pytest.raises(NotReplicated, match="only 0 of 1 replica"):
            client.submit(template, durable=True)  # no replica yet
        assert client.status(template.service_id).state == "queued"  # on the master only
        replica = pair.join()
        with pytest.raises(DuplicateService):  # the first try went through ...
            client.submit(template, durable=True)
        assert replica.hget(client.keys.service(template.service_id), "state")  # ... replicated
        other = ServiceParamTemplate("steps")
        assert client.submit(other, durable=True) == other.service_id
        assert replica.exists(client.keys.service(other.service_id))


def test_soaf_submit_is_durable_with_the_variable(pair: Pair, prefix: str) -> None:
    env = {"PATH": os.environ["PATH"], "SOAF_SECRET": SECRET, "SOAF_REDIS_URL": pair.url,
           "SOAF_PREFIX": prefix, "SOAF_DURABLE_SUBMIT": "1"}
    command = [sys.executable, "-m", "soaf.cli", "submit", "-s", "steps"]
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "only 0 of 1 replica(s) confirmed it" in out.stderr
    pair.join()
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_writer_keeps_a_final_state_no_replica_holds(pair: Pair, prefix: str) -> None:
    keys = Keys(prefix)
    r = connect(pair.url)
    r.xgroup_create(keys.submit, GROUP, id="0", mkstream=True)
    entry = r.xadd(keys.submit, {"id": "svc"}).decode()
    r.xreadgroup(GROUP, "core", {keys.submit: ">"})
    written: list[bool] = []
    writer = StateWriter(r, keys, replicas=1)
    writer.start()
    writer.put(Change("svc", 1, 1, {"state": "running"}))
    assert writer.flush(10)  # not final: no WAIT
    writer.put(Change("svc", 1, 2, {"state": "succeeded"}, ack=entry, on_written=written.append))
    wait_until(lambda: r.hget(keys.service("svc"), "state") == b'"succeeded"', 10,
               message="the final state on the master")
    assert not writer.flush(durable.WAIT_MS / 1000 + 1)  # kept: no replica confirmed it
    assert written == [] and r.xpending(keys.submit, GROUP)["pending"] == 1
    pair.join()
    assert writer.flush(60)  # sent again, confirmed, and only then acknowledged
    assert written == [True]
    assert r.xpending(keys.submit, GROUP)["pending"] == 0
    writer.stop()


def test_after_a_failover_the_writer_resends_what_was_never_replicated(pair: Pair,
                                                                      prefix: str) -> None:
    """The master acknowledges a final state that no replica got, then dies; the replica
    becomes master. What Sentinel does (point clients at the promoted replica) is done
    here by a symlink that the writer's unix-socket URL goes through, so that which write
    each server holds is decided by the test, not by timing."""
    keys = Keys(prefix)
    replica = pair.join()
    current = pair.dir / "current.sock"
    current.symlink_to(pair.dir / "master.sock")
    r = connect(f"unix://{current}")
    r.xgroup_create(keys.submit, GROUP, id="0", mkstream=True)
    entry = r.xadd(keys.submit, {"id": "svc"}).decode()
    r.xreadgroup(GROUP, "core", {keys.submit: ">"})
    writer = StateWriter(r, keys, replicas=1)
    writer.start()
    writer.put(Change("svc", 1, 1, {"state": "running"}))
    assert writer.flush(10)
    wait_until(lambda: replica.hget(keys.service("svc"), "state") == b'"running"', 10,
               message="the replica to hold 'running'")
    replica.replicaof("no", "one")  # the link breaks: nothing more reaches it
    written: list[bool] = []
    writer.put(Change("svc", 1, 2, {"state": "succeeded"}, ack=entry, on_written=written.append))
    wait_until(lambda: r.hget(keys.service("svc"), "state") == b'"succeeded"', 10,
               message="the old master to acknowledge the final state")
    pair.join("second", of=pair.replica)  # the promoted one gets a replica of its own
    pair.procs[0].kill()  # kill -9 of the old master, then the "failover"
    pair.procs[0].wait(10)
    current.unlink()
    current.symlink_to(pair.dir / "replica.sock")
    assert writer.flush(60)
    assert written == [True]
    assert replica.hget(keys.service("svc"), "state") == b'"succeeded"'  # re-sent
    assert replica.xpending(keys.submit, GROUP)["pending"] == 0  # and acknowledged there
    assert replica.xlen(keys.events("svc")) == 2
    writer.stop()


def test_durable_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOAF_DURABLE_SUBMIT", raising=False)
    monkeypatch.delenv("SOAF_DURABLE_REPLICAS", raising=False)
    assert (durable.replicas(), durable.replicas(True)) == (0, durable.DEFAULT_REPLICAS)
    monkeypatch.setenv("SOAF_DURABLE_SUBMIT", "1")
    monkeypatch.setenv("SOAF_DURABLE_REPLICAS", "2")
    assert (durable.replicas(), durable.replicas(False)) == (2, 0)
    monkeypatch.setenv("SOAF_DURABLE_REPLICAS", "0")
    with pytest.raises(ConfigError, match="SOAF_DURABLE_REPLICAS must be a whole number"):
        durable.replicas()


def test_the_async_client_submits_durably_too(pair: Pair, prefix: str) -> None:
    import asyncio

    from soaf import AsyncClient

    async def main() -> None:
        async with AsyncClient(pair.url, secret=SECRET, prefix=prefix) as client:
            with pytest.raises(NotReplicated):
                await client.submit(ServiceParamTemplate("steps"), durable=True)
            pair.join()
            template = ServiceParamTemplate("steps")
            assert await client.submit(template, durable=True) == template.service_id

    asyncio.run(main())
