"""Admission by resources on a real core: services that declare CPUs start only while
they fit, the rest wait queued (and say for what), one that can never fit is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from soaf import ServiceParamTemplate
from tests.conftest import crash, wait_until

ACTIVE = ("building", "preparing", "running")


def _watch(client, sids: list[str], *, timeout: float):
    """Poll the services until all are final: their records, how many were active at
    each look, and the ``waiting_for`` notes seen on queued ones."""
    seen_active: list[int] = []
    notes: set[str] = set()

    def all_final() -> bool:
        records = [client.status(s) for s in sids]
        seen_active.append(sum(r.state in ACTIVE for r in records))
        notes.update(r.get("waiting_for") for r in records
                     if r.state == "queued" and r.get("waiting_for"))
        return all(r.final for r in records)

    wait_until(all_final, timeout=timeout, interval=0.05)
    return [client.status(s) for s in sids], seen_active, notes


def _most_at_once(records) -> int:
    """The most runs whose [running_at, finished_at] overlap."""
    points = sorted([(r.get("running_at"), 1) for r in records]
                    + [(r.get("finished_at"), -1) for r in records])
    now = most = 0
    for _, step in points:  # an end sorts before a start at the same instant
        now += step
        most = max(most, now)
    return most


def test_services_run_only_while_their_cpus_fit(start_core, client):
    start_core(args=["--cpus", "4"])
    sids = [client.submit(ServiceParamTemplate("crunch", args={"seconds": 1}))
            for _ in range(6)]
    records, seen_active, notes = _watch(client, sids, timeout=60)
    assert all(r.state == "succeeded" for r in records), records
    assert max(seen_active) == 2, seen_active
    assert _most_at_once(records) == 2
    assert "2 CPUs (0 free on core-a)" in notes, notes
    assert all(r.get("waiting_for") is None for r in records)
    assert client.nodes()[0]["cpus"] == 4
    wait_until(lambda: client.nodes()[0]["cpus_used"] == 0, timeout=10)  # next heartbeat


def test_a_service_larger_than_any_core_is_refused_with_the_reason(start_core, client):
    start_core(args=["--cpus", "4", "--memory-mb", "1000"])
    wait_until(lambda: client.nodes(), timeout=10)
    big = client.wait(client.submit(ServiceParamTemplate("crunch", cpus=8)), timeout=30)
    assert big.state == "rejected", big
    assert big.error == "needs 8 CPUs; the largest core offers 4"
    fat = client.wait(client.submit(ServiceParamTemplate("crunch", memory_mb=4000)), timeout=30)
    assert fat.error == "needs 4000 MiB; the largest core offers 1000"
    small = client.wait(client.submit(ServiceParamTemplate("crunch", cpus=0.5,
                                                           args={"seconds": 0})), timeout=30)
    assert small.state == "succeeded", small


def test_nodes_shows_used_and_free_capacity(start_core, core_env, client):
    start_core(args=["--cpus", "4", "--memory-mb", "2000"])
    sid = client.submit(ServiceParamTemplate("crunch", memory_mb=500, args={"seconds": 30}))
    wait_until(lambda: client.status(sid).state == "running", timeout=20)
    wait_until(lambda: client.nodes()[0]["cpus_used"] == 2, timeout=10)
    out = subprocess.run([str(Path(sys.executable).parent / "soaf"), "nodes"], env=core_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "CPUS" in out.stdout and "MEMORY" in out.stdout, out.stdout
    assert "2/4 (2 free)" in out.stdout and "500/2000 MiB (1500 free)" in out.stdout, out.stdout
    client.cancel(sid)
    assert client.wait(sid, timeout=30).state == "cancelled"


def _crash_holding_both_slots(start_core, client) -> list[str]:
    """Two services of ``throttled`` (max_concurrent 2) running on core-a, core-a crashed
    (kill -9, programs too), core-b started; the two services' ids."""
    a = start_core(SOAF_NODE="core-a")
    held = [client.submit(ServiceParamTemplate("throttled", args={"seconds": 60}, max_lost=0))
            for _ in range(2)]
    wait_until(lambda: all(client.status(s).state == "running" for s in held), 30,
               message="both slots taken on core-a")
    crash(a, client, held)
    start_core(SOAF_NODE="core-b")
    return held


def test_a_takeover_that_ends_a_service_drops_its_slot_lease(start_core, client, redis_server,
                                                             prefix):
    """A service that a takeover ends (lost too often) holds no slot afterwards, even when
    no other service of its name comes to take a slot (which would drop expired leases)."""
    held = _crash_holding_both_slots(start_core, client)
    lost = [client.wait(s, timeout=60) for s in held]
    assert [(r.state, r.get("failure")) for r in lost] == [("failed", "lost")] * 2
    with redis.Redis.from_url(redis_server.url) as r:
        wait_until(lambda: r.zcard(f"{prefix}:slots:throttled") == 0, 10,
                   message="the leases of the ended services dropped")


def test_max_concurrent_caps_runs_across_two_cores(start_core, client, redis_server, prefix):
    start_core(SOAF_NODE="core-a")
    start_core(SOAF_NODE="core-b")
    sids = [client.submit(ServiceParamTemplate("throttled", args={"seconds": 1}))
            for _ in range(6)]
    records, seen_active, notes = _watch(client, sids, timeout=90)
    assert all(r.state == "succeeded" for r in records), records
    assert max(seen_active) == 2, seen_active
    assert _most_at_once(records) == 2
    assert any("max_concurrent 2" in n for n in notes), notes
    assert all(r.get("waiting_for") is None for r in records)
    with redis.Redis.from_url(redis_server.url) as r:  # every slot was given back
        assert r.zcard(f"{prefix}:slots:throttled") == 0


def test_the_slots_of_a_killed_core_come_free(start_core, client, redis_server, prefix):
    """A core killed with -9 (its programs with it) gives nothing back; its leases run out
    after the heartbeat TTL and the next service of that name starts on the survivor."""
    held = _crash_holding_both_slots(start_core, client)
    late = client.submit(ServiceParamTemplate("throttled", args={"seconds": 0.5}))
    assert client.wait(late, timeout=60).state == "succeeded"
    lost = [client.wait(s, timeout=60) for s in held]
    assert [(r.state, r.get("failure")) for r in lost] == [("failed", "lost")] * 2
    with redis.Redis.from_url(redis_server.url) as r:
        wait_until(lambda: r.zcard(f"{prefix}:slots:throttled") == 0, 10,
                   message="no slot left held")
