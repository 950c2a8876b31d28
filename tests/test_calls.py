"""The clients' sans-I/O core: what a reply means, paging, patience, reading the log stream."""

from __future__ import annotations

import json

import pytest

from soaf.client import calls
from soaf.client.calls import ListQuery, Patience
from soaf.client.logstream import LogFollow, TailRead
from soaf.errors import (
    ConfigError,
    DuplicateService,
    NoCoreOffers,
    RedisUnavailable,
    UnknownService,
    WaitTimeout,
)
from soaf.protocol.keys import Keys
from soaf.protocol.state import ServiceRecord
from soaf.protocol.template import ServiceParamTemplate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(sid: str, state: str, **fields) -> ServiceRecord:
    raw = {"state": state, "event_id": "1-0", **fields}
    return ServiceRecord.from_hash(sid, {k.encode(): json.dumps(v).encode() for k, v in raw.items()})


def test_cancel_verdicts_in_words():
    assert calls.cancelled("a", [b"cancelled", b"queued"]) == "cancelled (it was queued and never started)"
    assert calls.cancelled("a", [b"requested", b"running"]) == \
        "cancel requested; it was running and will end cancelled"
    assert calls.cancelled("a", [b"final", b"failed"]) == "already failed; nothing to cancel"
    with pytest.raises(UnknownService, match="'a'"):
        calls.cancelled("a", [b"unknown", b""])


def test_submit_reply_and_duplicates():
    t = ServiceParamTemplate("svc", service_id="a")
    assert calls.submitted(t, [1, b"1-0"]) == "a"
    with pytest.raises(DuplicateService, match=r"'a' was already submitted \(state running\)"):
        calls.submitted(t, [0, b'"running"'])
    with pytest.raises(NoCoreOffers, match="no live core offers 'svc': nothing was queued"):
        calls.submitted(t, [2, b""])


def test_target_resolution(tmp_path, monkeypatch):
    for name in ("SOAF_REDIS_URL", "SOAF_PREFIX", "SOAF_MAX_PAYLOAD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="no Redis to talk to"):
        calls.target(None, prefix=None, state_dir=tmp_path, max_payload=None)
    (tmp_path / "redis.url").write_text("redis://h:1/0\n")
    monkeypatch.setenv("SOAF_MAX_PAYLOAD", "77")
    found = calls.target(None, prefix="p", state_dir=tmp_path, max_payload=None)
    assert (found.url, found.keys.prefix, found.max_payload) == ("redis://h:1/0", "p", 77)
    assert calls.target("redis://x", prefix=None, state_dir=tmp_path, max_payload=5).max_payload == 5
    monkeypatch.setenv("SOAF_MAX_PAYLOAD", "lots")
    with pytest.raises(ConfigError, match="SOAF_MAX_PAYLOAD"):
        calls.target("redis://x", prefix=None, state_dir=tmp_path, max_payload=None)


def test_patience_backs_off_and_gives_up():
    clock = Clock()
    patience = Patience(3.0, clock=clock)
    failure = RedisUnavailable("down")
    pauses = []
    with pytest.raises(RedisUnavailable):
        while True:
            pauses.append(patience.pause(failure))
            clock.now += pauses[-1]
    assert pauses[:4] == [0.1, 0.2, 0.4, 0.8] and sum(pauses) == pytest.approx(3.0)
    near = Patience(30.0, deadline=100.05, clock=Clock())
    assert near.pause(failure) == pytest.approx(0.05)  # never past the call's own deadline


def test_list_query_pages_and_filters():
    query = ListQuery(state="failed", limit=2)
    assert query.page() == ("-inf", 0, calls.LIST_PAGE)
    ids = [b"a", b"b", b"gone", b"c"]
    hashes = [{k.encode(): json.dumps(v).encode() for k, v in {"state": s}.items()} if s else {}
              for s in ("failed", "succeeded", None, "failed")]
    query.feed(ids, hashes)
    assert [r.service_id for r in query.found] == ["a", "c"] and query.page() is None
    since = ListQuery(since=5.0)
    assert since.page()[0] == 5.0
    since.feed([], [])
    assert since.page() is None


def entry(eid: str, stream: str, text: str) -> tuple[bytes, dict[bytes, bytes]]:
    return eid.encode(), {b"s": stream.encode(), b"a": b"1", b"l": text.encode()}


def test_tail_read_pages_back_and_knows_when_redis_has_no_copy():
    read = TailRead(2, ["stdout"])
    assert read.request() == ("+", 100)
    read.feed([entry("5-0", "stderr", "e"), entry("4-0", "stdout", "d"), entry("3-0", "stdout", "c")])
    assert read.request() is None
    assert [line.text for line in read.lines] == ["c", "d"] and read.newest == "5-0"
    every = TailRead(None, None)
    every.feed([entry("2-0", "stdout", "b")])
    assert every.request() == ("(2-0", 500)
    every.feed([])
    assert [line.text for line in every.lines] == ["b"]
    empty = TailRead(0, None)
    assert empty.request() == ("+", 1)
    empty.feed([])
    assert empty.newest == "0-0" and empty.lines == []
    with pytest.raises(ValueError, match="stdin"):
        TailRead(1, ["stdin"])


def test_log_follow_ends_with_the_final_event_and_times_out():
    keys, clock = Keys("p"), Clock()
    follow = LogFollow(keys, record("s", "running"), position="3-0", streams=["stdout"],
                       timeout=5, clock=clock)
    assert follow.streams() == {keys.log("s"): "3-0", keys.events("s"): "1-0"}
    lines = follow.feed([(keys.log("s").encode(), [entry("4-0", "stdout", "x"),
                                                    entry("5-0", "soaf", "note")]),
                         (keys.events("s").encode(), [(b"2-0", {b"data": b'{"state": "succeeded"}'})])])
    assert [line.text for line in lines] == ["x"] and follow.final
    assert follow.after() == "(5-0"
    slow = LogFollow(keys, record("s", "running"), position="0-0", streams=None, timeout=1,
                     clock=clock)
    clock.now += 2
    with pytest.raises(WaitTimeout, match="not final after 1 s"):
        slow.block_ms()
