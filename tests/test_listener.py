"""Waiting through the notify channel against a real redis-server and no core: what a
wait costs Redis (INFO commandstats), a subscription lost mid-wait, timeouts, unknown ids.

Services are submitted by the client and ended by the test the way a core's scripts do
it: the record's state written, then a note published. Every test runs with ``Client``
and with ``AsyncClient`` (through tests/blocking.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import soaf.client.follow
import soaf.client.listener
from soaf import ServiceParamTemplate
from soaf.errors import UnknownService, WaitTimeout
from soaf.protocol.keys import Keys
from tests.blocking import flavours
from tests.conftest import SECRET, RedisServer, wait_until

#: Commands the test itself sends (ending services, reading the stats) or that every new
#: connection sends; the rest is the wait's.
NOT_THE_WAIT = {"hset", "publish", "info", "config", "pubsub", "multi", "exec", "client",
                "hello"}


@pytest.fixture(params=["sync", "async"])
def client(request, own_redis: RedisServer, prefix: str) -> Iterator[Any]:
    made = flavours()[request.param](own_redis.url, secret=SECRET, prefix=prefix)
    yield made
    made.close()


def calls(r: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}


def the_waits(r: redis.Redis) -> dict[str, int]:
    return {k: v for k, v in calls(r).items() if k not in NOT_THE_WAIT}


def end(r: Any, keys: Keys, sid: str, state: str = "succeeded") -> None:
    """What a core's script does when a service ends: the record, then the note."""
    r.hset(keys.service(sid), mapping={"state": json.dumps(state), "seq": 9})
    r.publish(keys.notify, json.dumps({"id": sid, "seq": 9, "state": state}))


def submit(client: Any, n: int) -> list[str]:
    return [client.submit(ServiceParamTemplate("nobody-runs-this")) for _ in range(n)]


def after_reads(r: redis.Redis, n: int, then: Callable[[], None]) -> threading.Thread:
    """A thread that runs ``then`` once ``n`` more records were read (HGETALL)."""
    start = calls(r).get("hgetall", 0)

    def run() -> None:
        wait_until(lambda: calls(r).get("hgetall", 0) >= start + n, 30, interval=0.005,
                   message=f"{n} records read")
        then()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_wait_on_many_ids_reads_each_record_once_more_when_it_ends(client, own_redis, prefix):
    r, keys, n = own_redis.client(), Keys(prefix), 40
    ids = submit(client, 2 * n)
    for sid in ids[:n]:
        end(r, keys, sid)
    r.config_resetstat()
    ending = after_reads(r, 2 * n, lambda: [end(r, keys, sid, "failed") for sid in ids[n:]])
    records = client.wait_all(ids, timeout=60)
    ending.join()
    assert [x.service_id for x in records] == ids
    assert [x.state for x in records] == ["succeeded"] * n + ["failed"] * n
    # Read all at once after subscribing, then once each as it ends: nothing per id
    # besides, no stream read, no polling.
    assert the_waits(r) == {"hgetall": 3 * n, "subscribe": 1}


def test_sequential_waits_share_one_subscription_and_read_twice_each(client, own_redis, prefix):
    r, keys = own_redis.client(), Keys(prefix)
    first, *ids = submit(client, 6)
    end(r, keys, first)
    assert client.wait(first, timeout=30).ok  # subscribes
    r.config_resetstat()
    for sid in ids:
        ending = after_reads(r, 1, lambda sid=sid: end(r, keys, sid))
        assert client.wait(sid, timeout=30).ok
        ending.join()
        assert client.wait(sid, timeout=30).ok  # already final: one read
    assert the_waits(r) == {"hgetall": 5 * 3}


def test_a_wait_for_what_the_client_submitted_while_subscribed_reads_final_records_only(
        client, own_redis, prefix):
    r, keys = own_redis.client(), Keys(prefix)
    first, = submit(client, 1)
    end(r, keys, first)
    assert client.wait(first, timeout=30).ok  # subscribes; the subscription outlives it
    ids = submit(client, 6)
    for sid in ids[:3]:
        end(r, keys, sid)  # before any wait for them: the notes are kept
    r.config_resetstat()
    # The others end while the wait runs, or before it starts: both are heard.
    ending = threading.Timer(0.2, lambda: [end(r, keys, sid, "failed") for sid in ids[3:]])
    ending.start()
    records = client.wait_all(ids, timeout=30)
    ending.join()
    assert [x.state for x in records] == ["succeeded"] * 3 + ["failed"] * 3
    assert the_waits(r) == {"hgetall": 6}  # each final record once, nothing before


def test_a_submit_that_wrote_nothing_is_waited_for_as_unknown(client, own_redis, prefix,
                                                              monkeypatch):
    from soaf.errors import NoCoreOffers

    monkeypatch.setattr(soaf.client.follow, "UNKNOWN_GRACE", 0.2)
    r, keys = own_redis.client(), Keys(prefix)
    first, = submit(client, 1)
    end(r, keys, first)
    assert client.wait(first, timeout=30).ok  # subscribes
    template = ServiceParamTemplate("nobody-runs-this")
    with pytest.raises(NoCoreOffers):
        client.submit(template, require_core=True)
    with pytest.raises(UnknownService):  # read, not waited for on the channel alone
        client.wait(template.service_id, timeout=30)


def test_many_notes_at_once_are_all_heard_in_order(own_redis):
    from soaf.client.listener import Listener
    from soaf.protocol.connection import connect

    conn = connect(own_redis.url, blocking=True)
    pubsub = conn.pubsub()
    pubsub.subscribe("ch")
    assert [m["type"] for m in Listener._read(pubsub)] == ["subscribe"]
    r = own_redis.client()
    with r.pipeline(transaction=False) as pipe:
        for i in range(5):
            pipe.publish("ch", f"m{i}")
        pipe.execute()
    pubsub.ping()
    heard: list[Any] = []
    # (Redis orders what one connection sends, not two: publish once the pong is back.)
    wait_until(lambda: heard.extend(Listener._read(pubsub)) or len(heard) >= 6, 10)
    r.publish("ch", "after")
    wait_until(lambda: heard.extend(Listener._read(pubsub)) or len(heard) >= 7, 10)
    assert [(m["type"], m["data"]) for m in heard] == [
        *[("message", f"m{i}".encode()) for i in range(5)], ("pong", b""), ("message", b"after")]
    pubsub.close()
    conn.close()


def test_a_subscription_lost_mid_wait_misses_no_final_state(client, own_redis, prefix):
    r, keys, n = own_redis.client(), Keys(prefix), 30
    ids = submit(client, n)

    def kill_and_end() -> None:
        # The notes are published while the subscriber is being dropped: all are lost.
        with r.pipeline(transaction=True) as pipe:
            pipe.client_kill_filter(_type="pubsub")
            for sid in ids:
                end(pipe, keys, sid)
            pipe.execute()

    r.config_resetstat()
    killing = after_reads(r, n, kill_and_end)
    got = [x.service_id for x in client.as_completed(ids, timeout=30)]
    killing.join()
    assert sorted(got) == sorted(ids)
    stats = the_waits(r)  # the states read once after the new subscription, then each record
    assert stats == {"subscribe": 2, "hgetall": 2 * n, "hget": n}


def test_timeouts(client, own_redis, prefix):
    r, keys = own_redis.client(), Keys(prefix)
    running, done = submit(client, 2)
    end(r, keys, done)
    with pytest.raises(WaitTimeout, match=f"1 service\\(s\\) not final after 0.3 s: {running}"):
        client.wait_all([done, running], timeout=0.3)
    seen = []
    with pytest.raises(WaitTimeout, match=running):
        for record in client.as_completed([running, done], timeout=0.3):
            seen.append(record.service_id)
    assert seen == [done]  # what is final comes before the timeout
    assert client.wait(done, timeout=0).ok  # no time at all, and final: returned


def test_unknown_ids_and_records_that_appear_late(client, own_redis, prefix, monkeypatch):
    r, keys = own_redis.client(), Keys(prefix)
    monkeypatch.setattr(soaf.client.follow, "UNKNOWN_GRACE", 0.3)
    good = submit(client, 1)[0]
    end(r, keys, good)
    with pytest.raises(UnknownService, match="no service with id 'nope'"):
        client.wait_all([good, "nope"], timeout=30)
    monkeypatch.setattr(soaf.client.follow, "UNKNOWN_GRACE", 60)

    def appear_then_end() -> None:  # as a core does with a plain XADD submission
        r.hset(keys.service("late"), mapping={"state": '"building"', "seq": 1})
        r.publish(keys.notify, json.dumps({"id": "late", "seq": 1, "state": "building"}))
        end(r, keys, "late")

    appearing = after_reads(r, 1, appear_then_end)
    assert client.wait("late", timeout=30).state == "succeeded"
    appearing.join()


def subscribers(r: redis.Redis, keys: Keys) -> int:
    return int(r.pubsub_numsub(keys.notify)[0][1])


def test_the_subscription_outlives_a_wait_a_little_then_ends_until_the_next(
        client, own_redis, prefix, monkeypatch):
    monkeypatch.setattr(soaf.client.listener, "IDLE_S", 0.3)
    r, keys = own_redis.client(), Keys(prefix)
    first, second = submit(client, 2)
    end(r, keys, first)
    assert client.wait(first, timeout=30).ok
    assert subscribers(r, keys) == 1
    wait_until(lambda: subscribers(r, keys) == 0, 10, message="the idle subscription to end")
    ending = after_reads(r, 1, lambda: end(r, keys, second))
    assert client.wait(second, timeout=30).ok  # a new subscription, before the read
    ending.join()
    assert subscribers(r, keys) == 1


def test_the_subscription_ends_with_the_client(client, own_redis, prefix):
    r, keys = own_redis.client(), Keys(prefix)
    sid = submit(client, 1)[0]
    end(r, keys, sid)
    client.wait(sid, timeout=30)
    assert subscribers(r, keys) == 1
    client.close()
    wait_until(lambda: subscribers(r, keys) == 0, 10, message="the subscription to end")
