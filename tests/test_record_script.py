"""The record script against a real Redis: what one call of it writes (events, record, one
note, the end of the entry) and how few commands that takes, keys of the wrong type
included."""

from __future__ import annotations

import json
import time

import pytest

from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.scripts import CLAIM, FINISH, RECORD
from soaf.protocol.state import (
    EVENTS_MAXLEN,
    FINAL_VALUES,
    Change,
    finish_call,
    record_call,
)
from tests.conftest import stream_events


@pytest.fixture
def r(redis_server):
    client = redis_server.client()
    for script in (RECORD, FINISH, CLAIM):
        script.load(client)
    yield client
    client.close()


def calls_of(r) -> dict[str, int]:
    return {name[len("cmdstat_"):]: int(stats["calls"])
            for name, stats in r.info("commandstats").items()}


def counted(r, run) -> dict[str, int]:
    """The commands (Lua's included) Redis ran for ``run()``, by command, less the INFO."""
    before = calls_of(r)
    run()
    after = calls_of(r)
    used = {name: n - before.get(name, 0) for name, n in after.items()}
    used["info"] -= 1
    return {name: n for name, n in used.items() if n > 0}


def record(r, keys: Keys, changes: list[Change], **kw) -> int:
    return int(RECORD.run(r, *record_call(keys, changes, **kw)))


def entry_of(r, keys: Keys) -> str:
    stream = keys.queue("svc", 0)
    if not r.exists(stream):
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    entry_id = r.xadd(stream, {"id": "x"}).decode()
    r.xreadgroup(GROUP, "core", {stream: ">"})
    return f"{stream}/{entry_id}"


def test_a_call_writes_every_event_one_hset_and_one_note(r, prefix):
    keys = Keys(prefix)
    pubsub = r.pubsub()
    pubsub.subscribe(keys.notify)
    pubsub.get_message(timeout=1)
    r.hset(keys.service("svc"), mapping={"state": '"building"', "seq": 2, "attempt": 1,
                                         "submitted_at": time.time()})
    changes = [Change("svc", 1, 3, {"state": "running", "pid": 42}),
               Change("svc", 1, 4, {"progress": 0.5}),
               Change("svc", 1, 5, {"progress": 0.75, "f:x": [1]})]
    used = counted(r, lambda: record(r, keys, changes))
    assert record(r, keys, changes) == 0  # sent again: nothing twice
    assert used == {"evalsha": 1, "hmget": 1, "xadd": 1, "hset": 1, "publish": 1}
    events = stream_events(r, keys.events("svc"))
    assert [e["seq"] for e in events] == [3, 4, 5] and events[0]["pid"] == 42
    stored = r.hgetall(keys.service("svc"))
    assert stored[b"state"] == b'"running"' and stored[b"progress"] == b"0.75"
    assert stored[b"seq"] == b"5" and stored[b"f:x"] == b"[1]"
    assert json.loads(stored[b"event_id"]) == r.xrange(keys.events("svc"))[-1][0].decode()
    note = pubsub.get_message(timeout=1)
    assert json.loads(note["data"]) == {"id": "svc", "seq": 5, "state": "running"}
    assert pubsub.get_message(timeout=0.2) is None  # one note per call
    pubsub.close()


def test_a_service_that_wrote_no_log_line_ages_without_its_log_key(r, prefix):
    """A final change saying the log stream cannot exist (``logs=False``) ages the record,
    its events and its payload, one EXPIRE fewer; by default the log stream ages too."""
    keys = Keys(prefix)
    for sid, logs, expires in (("quiet", False, 3), ("chatty", True, 4)):
        entry = entry_of(r, keys)
        r.hset(keys.service(sid), mapping={"state": '"running"', "seq": 3, "attempt": 1,
                                           "submitted_at": time.time()})
        r.set(keys.payload(sid), b"the payload")
        r.rpush(keys.log(sid), "a line")  # (were there one, it would be left as it is)
        final = Change(sid, 1, 4, {"state": "succeeded"}, ack=entry, logs=logs)
        used = counted(r, lambda final=final: record(r, keys, [final], record_ttl=100))
        assert used["expire"] == expires
        for key in (keys.service(sid), keys.events(sid), keys.payload(sid)):
            assert 0 < r.ttl(key) <= 100
        assert r.ttl(keys.log(sid)) == -1 if not logs else 0 < r.ttl(keys.log(sid)) <= 100


def test_a_final_state_finishes_its_entry_in_the_same_call(r, prefix):
    keys = Keys(prefix)
    entry = entry_of(r, keys)
    stream = entry.rpartition("/")[0]
    r.hset(keys.service("svc"), mapping={"state": '"running"', "seq": 3, "attempt": 1,
                                         "submitted_at": time.time(),
                                         "cancel_requested_at": time.time()})
    r.hset(keys.cancels, "svc", "a request")  # (as CANCEL leaves it, with the field above)
    r.rpush(keys.log("svc"), "a line")
    final = Change("svc", 1, 4, {"state": "succeeded"}, ack=entry, ttl=30)
    used = counted(r, lambda: record(r, keys, [final], record_ttl=100))
    assert used["evalsha"] == 1 and "type" not in used and "zadd" not in used
    assert r.xpending(stream, GROUP)["pending"] == 0 and r.xlen(stream) == 0
    assert not r.hexists(keys.cancels, "svc")
    for key in (keys.service("svc"), keys.events("svc"), keys.log("svc")):
        assert 0 < r.ttl(key) <= 30  # its own ttl: this call made the record final
    # A refusal meeting the final record: its entry is done, the record keeps its ttl.
    other = entry_of(r, keys)
    r.persist(keys.service("svc"))
    refusal = Change("svc", 1, 9, {"state": "rejected"}, ack=other, ttl=5)
    assert record(r, keys, [refusal], record_ttl=100) == -3
    assert r.xpending(stream, GROUP)["pending"] == 0
    assert 30 < r.ttl(keys.service("svc")) <= 100


def test_a_final_state_spends_a_cancel_request_only_when_one_was_made(r, prefix):
    keys = Keys(prefix)
    r.hset(keys.cancels, "other", "a request")
    entry = entry_of(r, keys)
    final = Change("svc", 1, 1, {"state": "succeeded"}, ack=entry)
    used = counted(r, lambda: record(r, keys, [final], record_ttl=100))
    assert "hdel" not in used  # no cancel_requested_at in the record: nothing to spend
    assert r.hexists(keys.cancels, "other")


def test_a_durable_writer_finishes_entries_in_a_second_call(r, prefix):
    """FINISH does what the record call leaves undone without ``finish``."""
    keys = Keys(prefix)
    entry = entry_of(r, keys)
    stream = entry.rpartition("/")[0]
    final = [Change("svc", 1, 1, {"state": "failed"}, ack=entry)]
    result = record(r, keys, final, record_ttl=100, finish=False)
    assert result == 1 and r.xpending(stream, GROUP)["pending"] == 1
    assert r.ttl(keys.service("svc")) == -1
    FINISH.run(r, *finish_call(keys, final, result, record_ttl=100))
    assert r.xpending(stream, GROUP)["pending"] == 0
    assert 0 < r.ttl(keys.service("svc")) <= 100


def test_an_id_is_indexed_again_only_when_it_may_have_been_dropped(r, prefix):
    keys = Keys(prefix)
    now = time.time()
    r.hset(keys.service("fresh"), mapping={"seq": 1, "submitted_at": now})
    r.hset(keys.service("old"), mapping={"seq": 1, "submitted_at": now - 500})
    for sid in ("fresh", "old", "new"):
        record(r, keys, [Change(sid, 1, 2, {"state": "running"}, ts=now)], record_ttl=100)
    assert r.zscore(keys.services, "fresh") is None  # SUBMIT indexed it
    assert r.zscore(keys.services, "old") == pytest.approx(now)  # the heartbeat may have dropped it
    assert r.zscore(keys.services, "new") == pytest.approx(now)  # no record before


def test_keys_of_the_wrong_type_are_dropped_where_first_touched(r, prefix):
    keys = Keys(prefix)
    for key in (keys.service("svc"), keys.events("svc"), keys.services):
        r.set(key, "junk")
    entry = entry_of(r, keys)
    assert record(r, keys, [Change("svc", 1, 1, {"state": "failed"}, ack=entry)]) == 1
    assert r.type(keys.service("svc")) == b"hash" and r.type(keys.events("svc")) == b"stream"
    assert r.type(keys.services) == b"zset"
    r.set(keys.cancels, "junk")
    r.hset(keys.service("c"), "cancel_requested_at", time.time())  # a cancel to spend
    assert record(r, keys, [Change("c", 1, 1, {"state": "failed"}, ack=entry_of(r, keys))]) == 1
    assert r.type(keys.cancels) == b"none"
    r.set(keys.service("b"), "junk")
    r.set(keys.events("b"), "junk")
    args = ["b", "svc", time.time(), "core", "q/1-1", keys.notify, EVENTS_MAXLEN, "1",
            ",".join(FINAL_VALUES), "", "1"]
    claim = [keys.service("b"), keys.events("b"), keys.services, keys.cancels]
    assert CLAIM.run(r, claim, args) == [b"expired"]  # the junk was no record
    args[-1] = "0"
    assert CLAIM.run(r, claim, args) == [b"run", b"building", 1, 1, b"", b"1"]
    # (the claim leaves its event to the run's first write, which drops the junk)
    assert record(r, keys, [Change("b", 1, 1, {"state": "building"})]) == 1
    assert r.type(keys.events("b")) == b"stream"


def test_values_are_encoded_as_json_dumps_would():
    from pathlib import Path

    from soaf.protocol.state import State, as_json

    for value in ("a", 'é\n"x', 1, -5, 10**20, 1.5, 0.1 + 0.2, -0.0, float("inf"),
                  float("nan"), None, True, False, [1, "a"], {"a": None}, State.RUNNING,
                  Path("/x")):
        assert as_json(value) == json.dumps(value, default=str), value
    change = Change("svc", 1, 2, {"state": "running", "é": 1}, ts=1.5)
    flat = [2, '{"seq": 2, "attempt": 1, "ts": 1.5, "state": "running", "\\u00e9": 1}',
            "running", 2, "state", '"running"', "é", "1"]
    assert change.flat() == flat
    assert change.flat() == flat  # the field names' quoted forms, kept from the first time


def test_a_claim_that_reads_the_cancels_hash_itself_hands_an_entry_back(r, prefix):
    """With UNREAD_CANCEL a claim writes nothing while the service has a cancel request:
    the core checks its signature and claims again with what it verified."""
    from soaf.protocol.scripts import UNREAD_CANCEL

    keys = Keys(prefix)
    claim = [keys.service("c"), keys.events("c"), keys.services, keys.cancels]
    args = ["c", "svc", time.time(), "core", "q/1-1", keys.notify, EVENTS_MAXLEN, "1",
            ",".join(FINAL_VALUES), UNREAD_CANCEL, "0"]
    r.hset(keys.cancels, "c", "signed?")
    assert CLAIM.run(r, claim, args) == [b"check", b"signed?", 0, 0, b""]
    assert not r.exists(keys.service("c"), keys.events("c"))
    args[9] = "signed?"  # verified
    assert CLAIM.run(r, claim, args)[:2] == [b"cancelled", b"cancelled"]
    assert not r.hexists(keys.cancels, "c")
    claim = [keys.service("d"), keys.events("d"), keys.services, keys.cancels]
    args[0], args[9] = "d", UNREAD_CANCEL
    r.set(keys.cancels, "junk")  # dropped, as a claim with a verified entry would
    assert CLAIM.run(r, claim, args)[:2] == [b"run", b"building"]
    assert r.type(keys.cancels) == b"none"


def test_the_journal_goes_to_the_record_once_a_call_and_into_no_event(r, prefix):
    """A run's journal is for a core that takes the run over, not for followers: the
    record keeps the newest of a call's journals, the events carry none."""
    keys = Keys(prefix)
    r.hset(keys.service("svc"), mapping={"state": '"building"', "seq": 2, "attempt": 1,
                                         "submitted_at": time.time()})
    changes = [Change("svc", 1, 3, {"state": "preparing", "journal": {"steps": ["built"]}}),
               Change("svc", 1, 4, {"state": "running", "journal": {"steps": ["running"]}}),
               Change("svc", 1, 5, {"progress": 0.5}),
               Change("svc", 1, 6, {"journal": {"steps": ["exited"]}}),
               Change("svc", 1, 7, {"progress": 0.75})]
    _, args = record_call(keys, changes)
    assert sum(arg == "journal" for arg in args) == 1  # sent once
    assert record(r, keys, changes) == 5
    assert json.loads(r.hget(keys.service("svc"), "journal")) == {"steps": ["exited"]}
    events = stream_events(r, keys.events("svc"))
    assert [e["seq"] for e in events] == [3, 4, 5, 6, 7]
    assert not any("journal" in e for e in events)
    assert events[0]["state"] == "preparing" and events[3] == {"seq": 6, "attempt": 1,
                                                               "ts": events[3]["ts"]}
