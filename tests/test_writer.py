"""The state writer against a real Redis that goes away: changes are kept, written in
order once it is back, never twice; finals of a superseded attempt are not acknowledged."""

from __future__ import annotations

import threading
import time

from soaf.core.writer import BUSY, StateWriter
from soaf.protocol.connection import connect
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.state import Change
from tests.conftest import stream_events, wait_until


def test_changes_made_while_redis_is_down_are_written_in_order(own_redis, prefix):
    keys = Keys(prefix)
    client = connect(own_redis.url)
    writer = StateWriter(client, keys)
    writer.start()
    for seq in range(1, 51):
        writer.put(Change("svc", 1, seq, {"progress": seq / 200}))
    assert writer.flush(10)
    own_redis.stop()
    for seq in range(51, 201):  # a service keeps reporting while Redis is away
        writer.put(Change("svc", 1, seq, {"progress": seq / 200}))
    wait_until(lambda: not writer.connected, 10, message="the writer to notice the outage")
    assert writer.pending() > 0
    own_redis.start()
    assert writer.flush(30)
    assert writer.connected
    r = own_redis.client()
    events = stream_events(r, keys.events("svc"))
    assert [e["seq"] for e in events] == list(range(1, 201))  # all, once, in order
    assert r.hget(keys.service("svc"), "progress") == b"1.0"
    writer.stop()


def delivered_entry(r, keys: Keys, consumer: str) -> str:
    """The id of a submit entry for "svc", delivered to ``consumer`` (pending)."""
    r.xgroup_create(keys.submit, GROUP, id="0", mkstream=True)
    entry = r.xadd(keys.submit, {"id": "svc"}).decode()
    r.xreadgroup(GROUP, consumer, {keys.submit: ">"})
    return entry


def test_a_final_fenced_out_by_a_newer_attempt_is_not_acknowledged(redis_server, prefix):
    r = redis_server.client()
    keys = Keys(prefix)
    entry = delivered_entry(r, keys, "new-owner")
    r.hset(keys.service("svc"), mapping={"attempt": 2, "seq": 5})
    writer = StateWriter(r, keys)
    writer.start()
    written: list[bool] = []
    done = threading.Event()
    writer.put(Change("svc", 1, 9, {"state": "succeeded"}, ack=entry, on_written=written.append))
    writer.put(Change("svc", 2, 6, {"state": "running"},
                      on_written=lambda ok: (written.append(ok), done.set())))
    assert done.wait(10)
    assert written == [False, True]
    assert r.xpending(keys.submit, GROUP)["pending"] == 1  # still the new owner's
    assert r.hget(keys.service("svc"), "state") == b'"running"'
    writer.put(Change("svc", 2, 7, {"state": "succeeded"}, ack=entry))
    assert writer.flush(10)
    assert r.xpending(keys.submit, GROUP)["pending"] == 0
    writer.stop()


def _record_calls(r) -> int:
    stats = r.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


def test_a_short_services_changes_go_in_one_call_with_its_final_state(redis_server, prefix):
    r = redis_server.client()
    keys = Keys(prefix)
    entry = delivered_entry(r, keys, "core")
    writer = StateWriter(r, keys)
    writer.hold = 60.0  # only the final state may send them
    writer.start()
    before = _record_calls(r)
    for seq, state in enumerate(["building", "preparing", "running"], 1):
        writer.put(Change("svc", 1, seq, {"state": state}))
        time.sleep(0.02)  # as a run makes them: a writer that sent each would have by now
    writer.put(Change("svc", 1, 4, {"exit_code": 0}))
    writer.put(Change("svc", 1, 5, {"state": "succeeded"}, ack=entry))
    wait_until(lambda: r.hget(keys.service("svc"), "state") == b'"succeeded"', 10,
               message="the final state, sent without waiting for the hold")
    assert _record_calls(r) - before == 1
    events = stream_events(r, keys.events("svc"))
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]  # every change its own event
    assert r.xlen(keys.events("svc")) == 1  # (in one stream entry)
    assert r.xpending(keys.submit, GROUP)["pending"] == 0
    writer.stop()


def test_another_services_final_state_does_not_send_the_changes_held_for_a_service(
        redis_server, prefix):
    r = redis_server.client()
    keys = Keys(prefix)
    r.xgroup_create(keys.submit, GROUP, id="0", mkstream=True)
    entries = {sid: r.xadd(keys.submit, {"id": sid}).decode() for sid in ("a", "b")}
    r.xreadgroup(GROUP, "core", {keys.submit: ">"})
    writer = StateWriter(r, keys)
    writer.hold = 60.0
    writer.start()
    before = _record_calls(r)
    writer.put(Change("a", 1, 1, {"state": "running"}))
    writer.put(Change("b", 1, 1, {"state": "running"}))
    writer.put(Change("b", 1, 2, {"state": "succeeded"}, ack=entries["b"]))
    wait_until(lambda: r.hget(keys.service("b"), "state") == b'"succeeded"', 10,
               message="b's final state, sent at once")
    time.sleep(0.05)
    assert r.hget(keys.service("a"), "state") is None  # still held: a has not ended
    writer.put(Change("a", 1, 2, {"state": "failed"}, ack=entries["a"]))
    wait_until(lambda: r.hget(keys.service("a"), "state") == b'"failed"', 10,
               message="a's final state")
    assert _record_calls(r) - before == 2  # one call per service
    assert [e["seq"] for e in stream_events(r, keys.events("a"))] == [1, 2]
    assert r.xpending(keys.submit, GROUP)["pending"] == 0
    writer.stop()


def test_changes_that_end_nothing_are_held_only_briefly(redis_server, prefix):
    r = redis_server.client()
    keys = Keys(prefix)
    writer = StateWriter(r, keys)
    writer.hold = 2.0
    writer.start()
    writer.put(Change("svc", 1, 1, {"state": "running"}))
    writer.put(Change("svc", 1, 2, {"progress": 0.5}))
    assert r.hget(keys.service("svc"), "progress") is None  # held: more may follow
    wait_until(lambda: r.hget(keys.service("svc"), "progress") == b"0.5", 10,
               message="held changes to go out once the hold is over")
    assert [e["seq"] for e in stream_events(r, keys.events("svc"))] == [1, 2]
    writer.put(Change("svc", 1, 3, {"progress": 0.75}))
    assert writer.flush(1.0)  # a flush does not wait for the hold
    assert r.hget(keys.service("svc"), "progress") == b"0.75"
    writer.stop()


def test_while_many_services_have_changes_waiting_each_waits_longer(redis_server, prefix):
    r = redis_server.client()
    keys = Keys(prefix)
    writer = StateWriter(r, keys)
    writer.hold, writer.busy_hold = 0.05, 60.0
    writer.start()
    many = [f"s{i}" for i in range(BUSY + 1)]
    for sid in many:
        writer.put(Change(sid, 1, 1, {"state": "running"}))
    time.sleep(0.5)  # ten times the short hold
    assert not any(r.exists(keys.service(sid)) for sid in many)  # a busy core's: held
    assert writer.flush(10)
    assert all(r.exists(keys.service(sid)) for sid in many)
    writer.put(Change("alone", 1, 1, {"state": "running"}))  # one service: the short hold
    wait_until(lambda: r.exists(keys.service("alone")), 10, message="the short hold to end")
    writer.stop()
