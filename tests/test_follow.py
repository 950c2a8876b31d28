"""Follow: positions, block lengths, deadlines and unknown ids, with a clock of our own."""

from __future__ import annotations

import json

import pytest

from soaf.client import follow as follow_module
from soaf.client.follow import BLOCK_MS, Follow
from soaf.errors import UnknownService, WaitTimeout
from soaf.protocol.keys import Keys
from soaf.protocol.state import ServiceRecord


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(sid: str, state: str, event_id: str) -> ServiceRecord:
    return ServiceRecord.from_hash(sid, {b"state": json.dumps(state).encode(),
                                         b"event_id": json.dumps(event_id).encode()})


def entry(entry_id: str, **event) -> tuple[bytes, dict[bytes, bytes]]:
    return entry_id.encode(), {b"data": json.dumps(event).encode()}


def test_positions_come_from_records_and_advance_with_each_read():
    keys = Keys("p")
    f = Follow(keys)
    assert f.add("a", record("a", "running", "5-0"))
    assert f.add("b", record("b", "queued", "7-0"), replay=True)
    assert not f.add("c", record("c", "succeeded", "9-0"))  # final: nothing to follow
    assert f.streams() == {keys.events("a"): "5-0", keys.events("b"): "0-0"}
    got = f.feed([(keys.events("a").encode(), [entry("6-0", progress=0.5),
                                               entry("8-0", state="failed")]),
                  (keys.events("b").encode(), [entry("7-0", state="queued")])])
    assert [(sid, e["event_id"]) for sid, e in got] == [("a", "6-0"), ("a", "8-0"), ("b", "7-0")]
    assert f.streams() == {keys.events("b"): "7-0"}  # a is final: no longer followed


def test_the_events_written_together_in_one_entry_are_read_in_order():
    keys = Keys("p")
    f = Follow(keys)
    f.add("a", record("a", "building", "1-0"))
    together = json.dumps([{"seq": 2, "state": "running"}, "not an event",
                           {"seq": 3, "state": "succeeded"}, {"seq": 4, "progress": 1}])
    got = f.feed([(keys.events("a").encode(), [(b"2-0", {b"data": together.encode()})])])
    assert [(e["seq"], e["event_id"]) for _, e in got] == [(2, "2-0"), (3, "2-0")]
    assert f.streams() == {}  # its final event was among them


def test_deadline_and_block_length():
    clock = Clock()
    f = Follow(Keys(), timeout=1.5, clock=clock)
    f.add("a", record("a", "running", "1-0"))
    assert f.block_ms() == 1500
    clock.now += 1.0
    assert f.block_ms() == 500
    clock.now += 0.6
    with pytest.raises(WaitTimeout, match=r"1 service\(s\) not final after 1\.5 s: a"):
        f.block_ms()
    assert Follow(Keys(), clock=clock).block_ms() == BLOCK_MS


def test_an_id_without_record_gets_a_grace_then_is_unknown(monkeypatch):
    monkeypatch.setattr(follow_module, "UNKNOWN_GRACE", 3.0)
    clock = Clock()
    f = Follow(Keys(), clock=clock)
    f.add("ghost", None)
    f.add("late", None)
    assert f.block_ms() == 2000 and f.overdue() == []
    clock.now += 2.5
    assert f.block_ms() == 500  # wakes up when the grace ends
    f.feed([(Keys().events("late").encode(), [entry("1-0", state="queued")])])
    clock.now += 0.5
    assert f.overdue() == ["ghost"]  # late sent an event: it exists
    f.resolve("ghost", True)
    assert f.overdue() == []
    f.add("gone", None)
    clock.now += 3.0
    with pytest.raises(UnknownService, match="no service with id 'gone'"):
        f.resolve(f.overdue()[0], False)
