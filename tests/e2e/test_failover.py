"""Redis Sentinel failover: kill -9 the master while services run; every service submitted
durably reaches exactly one final state.

The deployment (tests/sentinels.py) is real: a master, two replicas and three sentinels,
each a ``redis-server`` process. Two cores and the client reach it only through the
``redis+sentinel://`` URL (the cores through ``SOAF_SENTINELS``/``SOAF_SENTINEL_MASTER``),
with ``SOAF_DURABLE_SUBMIT=1``: submissions and the cores' final states count only once a
replica holds them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from soaf import Client, ServiceParamTemplate
from soaf.errors import DuplicateService, RedisUnavailable
from soaf.protocol.connection import connect
from soaf.protocol.sentinel import parse
from soaf.protocol.state import FINAL_VALUES, decode_events
from tests.conftest import ROOT, SECRET, stream_events, wait_until
from tests.sentinels import MASTER_NAME, Sentinels, sentinels  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(300)


def submit_durably(client: Client, template: ServiceParamTemplate, *, within: float = 60) -> str:
    """What a careful user does: repeat a durable submit that failed until it went through
    (DuplicateService: an earlier try did, and is on a replica)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return client.submit(template, durable=True)
        except DuplicateService:
            return template.service_id
        except RedisUnavailable:  # also NotReplicated
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def sentinel_client(sentinels: Sentinels, prefix: str) -> Iterator[Client]:
    with Client(sentinels.url, secret=SECRET, prefix=prefix, reconnect_for=120) as c:
        yield c


def steps(n: int = 8, delay: float = 0.25) -> ServiceParamTemplate:
    return ServiceParamTemplate("steps", args={"n": n, "delay": delay}, watch_interval=0.1)


@pytest.mark.parametrize("freeze", [False, True], ids=["kill-9", "host-lost"])
def test_durable_services_survive_a_failover(sentinels: Sentinels, start_core, prefix: str,
                                             sentinel_client: Client, freeze: bool) -> None:
    spec = parse(sentinels.url)
    env = {"SOAF_REDIS_URL": "", "SOAF_DURABLE_SUBMIT": "1", "SOAF_MAX_SERVICES": "4",
           "SOAF_SENTINELS": ",".join(f"{h}:{p}" for h, p in spec.sentinels),
           "SOAF_SENTINEL_MASTER": MASTER_NAME}
    cores = [start_core(SOAF_NODE=f"core-{n}", SOAF_HOST_ID=f"host-{n}", **env) for n in "ab"]
    client = sentinel_client
    before = [submit_durably(client, steps()) for _ in range(12)]
    r = connect(sentinels.url)

    def r_events(sid: str) -> list:
        return r.xrange(client.keys.events(sid))

    wait_until(lambda: sum(client.status(s).state == "running" for s in before) >= 3, 60,
               message="services to run")

    old = sentinels.kill_master(freeze=freeze)
    during = [submit_durably(client, steps(n=3)) for _ in range(8)]
    assert sentinels.master_port() != old

    ids = before + during
    records = client.wait_all(ids, timeout=200)
    assert [r.state for r in records] == ["succeeded"] * len(ids), [  # all we know of them
        (i, r.service_id, r.state, r.error, r.get("failure"), r.get("attempts"),
         [e for _, f in r_events(r.service_id) for e in decode_events(f)])
        for i, r in enumerate(records) if r.state != "succeeded"]

    def finals(sid: str) -> list[str]:
        return [e["state"] for e in stream_events(r, client.keys.events(sid))
                if e.get("state") in FINAL_VALUES]

    # A final state read from a master that Sentinel has just called down may not be on the
    # one it promoted yet (Sentinel can fail over twice when it loses sight of a fresh master
    # on a busy host): the core that wrote it keeps it until a replica confirms it, and
    # writes it again to the new master (or, had the service been taken over, the new
    # attempt ends it). Wait for that; then each history holds exactly one.
    wait_until(lambda: all(finals(sid) for sid in ids), 120,
               message="every service's final state on the current master")
    for sid in ids:  # exactly one final state in each service's history
        assert finals(sid) == ["succeeded"], (sid, finals(sid))
    assert all(core.alive() for core in cores)
    assert all("final states count as written once 1 replica(s) hold them" in core.log()
               for core in cores)
    assert r.xlen(client.keys.submit) == 0  # every entry acknowledged on the new master

    # The CLI finds the new master through the same URL.
    out = subprocess.run(
        [sys.executable, "-m", "soaf.cli", "status", ids[0], "--redis", sentinels.url,
         "--prefix", prefix], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"SOAF_SECRET": SECRET, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "succeeded" in out.stdout



def test_a_command_on_a_lost_master_retries_on_the_new_one(sentinels: Sentinels) -> None:
    """A connection open to a master whose host is lost times out; the retry inside the
    same command must go where Sentinel now points (redis-py alone reconnects to the old
    address within a command's retries), for the sync and the asyncio flavour."""
    import asyncio

    from soaf.protocol.connection import connect_async

    r = connect(sentinels.url, timeout=2.0)
    r.set("k", "1")

    def lose_the_master() -> int:
        old = sentinels.kill_master(freeze=True)
        wait_until(lambda: sentinels.master_port() != old, 30, message="Sentinel to fail over")
        return old

    def timed(fn) -> float:
        started = time.monotonic()
        assert fn()
        return time.monotonic() - started

    async def main() -> None:
        aio = connect_async(sentinels.url, timeout=2.0)
        await aio.set("k", "1")
        old = await asyncio.to_thread(lose_the_master)
        started = time.monotonic()
        assert await aio.set("k", "2")  # the old master's socket times out, then the new one
        assert time.monotonic() - started < 3 * 2.0
        assert await asyncio.to_thread(timed, lambda: r.set("k", "3")) < 3 * 2.0
        assert r.connection_pool.get_master_address()[1] != old
        await aio.aclose()

    asyncio.run(main())
