"""A core's take on a redis-server of its own (its commands counted): a core that took all
there was blocks without asking Redis anything else, keeps its watch list right itself,
and scans when a wake brought it nothing."""

from __future__ import annotations

import threading

import pytest

from soaf.core.routing import Router
from soaf.plugin.loader import Registry
from soaf.plugin.program import ServiceProgramTemplate
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.queues import member


class A(ServiceProgramTemplate):
    name = "a"


@pytest.fixture
def r(own_redis):
    return own_redis.client()


@pytest.fixture
def router(own_redis, r, prefix):
    registry = Registry(number=1, digest="0" * 64, programs={"a": A})
    return Router(r, own_redis.client(), Keys(prefix), node="n1", labels=frozenset(),
                  registry=lambda: registry, ttl=5, stopping=threading.Event())


def push(r, keys: Keys, name: str, *, priority: int = 0, ready: bool = True) -> None:
    queue = keys.queue("a", priority)
    if not r.exists(queue):
        r.xgroup_create(queue, GROUP, id="0", mkstream=True)
        r.sadd(keys.queues, member("a", priority))
        r.xadd(keys.new_queues, {"queue": member("a", priority)})
    r.xadd(queue, {"name": name})
    if ready:
        r.sadd(keys.ready, member("a", priority))


def names(entries) -> list[str]:
    return [fields[b"name"].decode() for _, fields in entries]


def calls(r) -> dict[str, int]:
    """Commands since the last CONFIG RESETSTAT, but those of the count itself and of a
    connection's handshake."""
    found = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}
    return {k: n for k, n in found.items() if k not in ("info", "config", "client", "hello")}


def test_after_taking_all_there_was_a_core_only_blocks(router, r, prefix):
    keys = Keys(prefix)
    push(r, keys, "one")
    assert names(router.take(5, block_ms=10)) == ["one"]  # a scan: the first take
    r.config_resetstat()
    assert router.take(5, block_ms=10) == []
    assert calls(r) == {"xread": 1}  # no take, no scan: the queue was drained
    push(r, keys, "two")
    r.config_resetstat()
    assert names(router.take(5, block_ms=5000)) == ["two"]
    used = calls(r)
    # One queue ready: read at once, no look at each queue's group and next entry.
    assert used == {"xread": 1, "evalsha": 1, "smembers": 1, "xreadgroup": 1, "srem": 1}, used
    r.config_resetstat()
    assert router.take(5, block_ms=10) == []
    assert calls(r) == {"xread": 1}


def test_a_wake_that_brings_nothing_makes_the_next_take_a_scan(router, r, prefix):
    keys = Keys(prefix)
    push(r, keys, "one")
    assert names(router.take(5, block_ms=10)) == ["one"]
    push(r, keys, "plain", ready=False)  # a plain XADD: only a scan finds it
    assert router.take(5, block_ms=5000) == []
    assert names(router.take(5, block_ms=10)) == ["plain"]
    push(r, keys, "urgent", priority=9)  # a new queue: its announcement wakes the core
    push(r, keys, "calm")
    taken = router.take(5, block_ms=5000) or router.take(5, block_ms=5000)
    assert names(taken) == ["urgent", "calm"]
    assert router.take(5, block_ms=10) == []


def test_entries_another_core_took_do_not_keep_a_core_awake(router, own_redis, r, prefix):
    keys = Keys(prefix)
    registry = Registry(number=1, digest="0" * 64, programs={"a": A})
    other = Router(r, own_redis.client(), keys, node="n2", labels=frozenset(),
                   registry=lambda: registry, ttl=5, stopping=threading.Event())
    push(r, keys, "one")
    assert names(router.take(5, block_ms=10)) == ["one"]
    push(r, keys, "two")
    assert names(other.take(5, block_ms=10)) == ["two"]
    assert router.take(5, block_ms=5000) == []  # woken by "two", taken by the other core
    r.config_resetstat()
    assert router.take(5, block_ms=10) == []  # a scan puts its watch past "two"
    r.config_resetstat()
    assert router.take(5, block_ms=10) == []
    assert calls(r) == {"xread": 1}


def test_a_take_of_nothing_delivers_nothing(r, prefix):
    from soaf.protocol.queues import PRIORITY_AGING
    from soaf.protocol.scripts import TAKE

    keys = Keys(prefix)
    push(r, keys, "one")
    taken, _ = TAKE.run(r, [keys.queues, keys.submit, keys.ready, keys.new_queues],
                        [GROUP, "n1", 0, 0, int(PRIORITY_AGING * 1000), keys.queue_prefix, 0, "a"])
    assert taken == [] and r.xpending(keys.queue("a", 0), GROUP)["pending"] == 0
