"""The queues on a real redis-server: what a core's TAKE delivers, in which order, and how
many; put-backs; entry references; labels."""

from __future__ import annotations

import time

import pytest

from soaf.core.routing import Router, covers, own_pending
from soaf.plugin.program import ServiceProgramTemplate
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.queues import PRIORITY_AGING, member, parse_labels, parse_member, split_ref
from soaf.protocol.scripts import REQUEUE, TAKE


@pytest.fixture
def r(redis_server):
    return redis_server.client()


def push(r, keys: Keys, service: str, priority: int, name: str, age: float = 0.0) -> str:
    """An entry ``age`` seconds old in the queue of (service, priority)."""
    queue = keys.queue(service, priority)
    if not r.exists(queue):
        r.xgroup_create(queue, GROUP, id="0", mkstream=True)
    r.sadd(keys.queues, member(service, priority))
    ms = int((time.time() - age) * 1000)
    last = r.xinfo_stream(queue)["last-generated-id"].decode()
    ms = max(ms, int(last.split("-")[0]) + 1)
    return r.xadd(queue, {"name": name}, id=f"{ms}-0").decode()


def take_raw(r, keys: Keys, count: int, *services: str, consumer: str = "c1",
             scan: bool = True) -> list:
    return TAKE.run(r, [keys.queues, keys.submit, keys.ready, keys.new_queues],
                    [GROUP, consumer, count, int(time.time() * 1000),
                     int(PRIORITY_AGING * 1000), keys.queue_prefix, int(scan), *services])


def take(r, keys: Keys, count: int, *services: str, consumer: str = "c1",
         scan: bool = True) -> list[str]:
    taken, _ = take_raw(r, keys, count, *services, consumer=consumer, scan=scan)
    return [dict(zip(f[::2], f[1::2]))[b"name"].decode() for _, _, f in taken]


def test_take_delivers_exactly_count_best_priority_first_and_only_offered(r, prefix):
    keys = Keys(prefix)
    push(r, keys, "a", 0, "a0-old", age=5)
    push(r, keys, "a", 5, "a5")
    push(r, keys, "b", 9, "b9")
    push(r, keys, "a", 0, "a0-new")
    push(r, keys, "x", 100, "x100")  # a service this core does not offer
    assert take(r, keys, 2, "a", "b") == ["b9", "a5"]
    assert take(r, keys, 5, "a", "b") == ["a0-old", "a0-new"]  # oldest first among equals
    taken, watch = take_raw(r, keys, 5, "a", "b")
    # Nothing left: where to block, each offered queue after its last delivered entry,
    # and the streams that do not exist yet (the old one, the new-queue bell) from 0.
    last = {q: r.xinfo_stream(q)["last-generated-id"]
            for q in (keys.queue("a", 0), keys.queue("a", 5), keys.queue("b", 9))}
    last.update({keys.submit: b"0-0", keys.new_queues: b"0-0"})
    assert taken == [] and {s.decode(): i for s, i in watch} == last
    # Delivered entries are this consumer's, and nothing it did not take is.
    assert r.xpending(keys.queue("x", 100), GROUP)["pending"] == 0
    assert sum(r.xpending(keys.queue(*q), GROUP)["pending"]
               for q in (("a", 0), ("a", 5), ("b", 9))) == 4


def test_a_plain_take_looks_only_at_ready_queues_a_scan_at_all(r, prefix):
    keys = Keys(prefix)
    push(r, keys, "a", 0, "unannounced")  # a plain XADD: not marked ready
    assert take(r, keys, 5, "a", scan=False) == []
    assert take(r, keys, 1, "a", scan=True) == ["unannounced"]
    assert not r.sismember(keys.ready, "a:0")  # drained: no longer ready
    push(r, keys, "a", 0, "next")
    r.sadd(keys.ready, "a:0")
    assert take(r, keys, 5, "a", scan=False) == ["next"]
    assert r.smembers(keys.ready) == set()


def test_waiting_raises_priority_so_low_priority_is_not_starved(r, prefix):
    keys = Keys(prefix)
    push(r, keys, "a", 0, "waited-11-minutes", age=11 * PRIORITY_AGING)
    push(r, keys, "a", 10, "fresh-10")
    push(r, keys, "a", 12, "fresh-12")
    assert take(r, keys, 3, "a") == ["fresh-12", "waited-11-minutes", "fresh-10"]


def test_take_creates_missing_groups_and_reads_the_old_stream_first(r, prefix):
    keys = Keys(prefix)
    r.xadd(keys.queue("a", 0), {"name": "plain-xadd"})  # no group yet
    r.sadd(keys.queues, "a:0", "junk", "a:notanumber")
    r.xadd(keys.submit, {"name": "old"})
    r.xgroup_create(keys.submit, GROUP, id="0")
    assert take(r, keys, 5, "a") == ["old", "plain-xadd"]
    r.set(keys.queue("b", 0), "not a stream")
    r.sadd(keys.queues, "b:0")
    assert take(r, keys, 5, "a", "b") == []  # a key of the wrong type is passed over


def test_own_pending_collects_references_across_queues(r, prefix):
    keys = Keys(prefix)
    first = push(r, keys, "a", 0, "one")
    push(r, keys, "b", 3, "other-core")
    second = push(r, keys, "b", 3, "two")
    assert take(r, keys, 1, "b", consumer="c2") == ["other-core"]
    assert take(r, keys, 5, "a", "b") == ["two", "one"]
    held = own_pending(r, keys, "c1")
    assert sorted(ref for ref, _ in held) == sorted(
        [f"{keys.queue('a', 0)}/{first}", f"{keys.queue('b', 3)}/{second}"])
    assert split_ref(keys, held[0][0])[0] in (keys.queue("a", 0), keys.queue("b", 3))
    assert split_ref(keys, "1-0") == (keys.submit, "1-0")  # older versions' bare ids


def test_requeue_moves_an_entry_and_the_record_follows(r, prefix):
    keys = Keys(prefix)
    old = push(r, keys, "a", 0, "moved")
    take(r, keys, 1, "a")
    ref = f"{keys.queue('a', 0)}/{old}"
    r.hset(keys.service("sid"), "entry", f'"{ref}"')
    new = REQUEUE.run(r, [keys.queue("a", 0), keys.queues, keys.queue("a", 0),
                          keys.service("sid"), keys.ready, keys.new_queues],
                      [GROUP, "a:0", old, ref, "name", "moved"]).decode()
    assert r.xpending(keys.queue("a", 0), GROUP)["pending"] == 0
    assert [e[0].decode() for e in r.xrange(keys.queue("a", 0))] == [new]
    assert r.hget(keys.service("sid"), "entry").decode().replace("\\/", "/") == \
        f'"{keys.queue("a", 0)}/{new}"'
    assert take(r, keys, 1, "b", "a", consumer="c2") == ["moved"]


def test_router_offers_only_what_its_labels_cover(r, prefix, redis_server):
    import threading

    from soaf.plugin.loader import Registry

    class Gpu(ServiceProgramTemplate):
        name, requires = "gpu-job", {"gpu"}

    class Plain(ServiceProgramTemplate):
        name = "plain"

    class Broken(ServiceProgramTemplate):
        name, requires = "broken", "gpu"  # a string, not a set of names

    registry = Registry(number=1, digest="0" * 64,
                        programs={"gpu-job": Gpu, "plain": Plain, "broken": Broken})
    assert covers(Gpu, frozenset({"gpu", "bigmem"})) and not covers(Gpu, frozenset())
    keys = Keys(prefix)
    router = Router(r, redis_server.client(), keys, node="n1", labels=frozenset({"bigmem"}),
                    registry=lambda: registry, ttl=5, stopping=threading.Event())
    assert router.offered() == ["plain"]
    router.publish_offers()
    assert r.zscore(keys.offered, "plain") > time.time()
    assert r.zscore(keys.offered, "gpu-job") is None
    push(r, keys, "gpu-job", 0, "g")
    push(r, keys, "plain", 0, "p")
    assert [f[b"name"] for _, f in router.take(5, block_ms=0)] == [b"p"]


def test_labels_and_members_are_checked():
    assert parse_labels(" gpu, bigmem ,") == {"gpu", "bigmem"}
    with pytest.raises(ValueError, match="label 'two words'"):
        parse_labels("gpu,two words")
    assert parse_member("svc.name-1:-5") == ("svc.name-1", -5)
    assert parse_member("svc:5000") is None and parse_member("a:b:1") is None


def test_submit_and_take_survive_keys_of_the_wrong_type(client, r, prefix):
    """Redis is not trusted: index, ready set, offers and bell overwritten with strings
    delay nothing that a scan does not find."""
    from soaf import ServiceParamTemplate

    keys = Keys(prefix)
    for key in (keys.offered, keys.ready, keys.queues, keys.new_queues):
        r.set(key, "not what it should be")
    sid = client.submit(ServiceParamTemplate("a"))
    assert client.status(sid).get("waiting_for") == "no live core offers 'a'"
    r.set(keys.ready, "again")
    taken, _ = take_raw(r, keys, 5, "a", scan=True)
    assert [f[f.index(b"id") + 1] for _, _, f in taken] == [sid.encode()]


def test_an_idle_take_and_a_submit_ask_no_key_its_type(client, r, prefix):
    """The wrong types are caught where a command fails, not asked of every key every time."""
    from soaf import ServiceParamTemplate

    keys = Keys(prefix)
    client.submit(ServiceParamTemplate("a"))
    take_raw(r, keys, 5, "a")

    def calls() -> dict[str, int]:
        return {k: int(v["calls"]) for k, v in r.info("commandstats").items()}

    before = calls()
    client.submit(ServiceParamTemplate("a"))
    assert len(take_raw(r, keys, 5, "a", scan=False)[0]) == 1
    assert take_raw(r, keys, 5, "a")[0] == []
    after = calls()
    used = {k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)}
    assert "cmdstat_type" not in used, used
    assert used.get("cmdstat_exists") == 1, used  # the submit's: is there a record already
