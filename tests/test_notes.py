"""Waiting on the notify channel without I/O: what a wait reads and when, with a clock of
our own (soaf.client.notes); and the listener's PING rule."""

from __future__ import annotations

import json

import pytest
import redis

from soaf.client import follow as follow_module
from soaf.client import listener as listener_module
from soaf.client.listener import Liveness
from soaf.client.notes import QUIET_S, Board, Task, Wait
from soaf.errors import RedisUnavailable, UnknownService, WaitTimeout


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hashed(state: str) -> dict[bytes, bytes]:
    return {b"state": json.dumps(state).encode()}


def note(sid: str, state: str | None = None, seq: int = 3) -> bytes:
    body: dict[str, object] = {"id": sid, "seq": seq}
    if state is not None:
        body["state"] = state
    return json.dumps(body).encode()


def test_records_are_read_once_after_the_subscription_then_only_on_final_notes():
    clock = Clock()
    board = Board(clock)
    w = Wait(["a", "b", "c", "a"], timeout=10, clock=clock)
    board.join(w)
    assert w.task(board) is None  # not subscribed yet: a read now could miss a note
    assert w.block_s(board) == 10  # no deadline yet before the first read: it is the wake
    assert board.up() == [w]
    first = w.task(board)
    assert first == Task(["a", "b", "c"])  # whole records, in the order given
    assert board.hear(note("b", "succeeded")) == [w]  # heard while the read was on its way
    done = w.settle(first, [hashed("succeeded"), hashed("succeeded"), hashed("running")])
    assert [r.service_id for r in done] == ["a", "b"] and w.pending == {"c"}
    assert w.task(board) is None  # b's note is no news: it was final in the read
    assert board.hear(note("c", "running")) == []  # not final
    assert board.hear(note("x", "failed")) == []  # not waited for
    assert board.hear(b"garbage") == [] and board.hear(b'["c"]') == []
    assert board.hear(b'{"id": "c", "state": ["failed"]}') == []  # anyone may publish
    assert board.hear(note("c", "failed")) == [w]
    assert w.task(board) == Task(["c"])
    assert [r.state for r in w.settle(Task(["c"]), [hashed("failed")])] == ["failed"]
    assert not w.pending
    board.leave(w)
    assert board.hear(note("c", "failed")) == []


def test_a_new_subscription_makes_every_wait_read_the_states_still_pending_once():
    clock = Clock()
    board = Board(clock)
    w = Wait(["a", "b", "c"], clock=clock, reconnect_for=5)
    board.join(w)
    board.up()
    w.settle(w.task(board), [hashed("running"), hashed("running"), hashed("succeeded")])
    assert board.down(RedisUnavailable("gone")) == [w]
    assert w.task(board) is None and w.block_s(board) == 5  # rides it out for a while
    clock.now += 2
    board.up()
    again = w.task(board)
    assert again == Task(["a", "b"], states=True)  # the state field only: cheap
    assert w.task(board) is None  # once
    assert w.settle(again, [b'"failed"', b'["tampered"]']) == []
    assert w.task(board) == Task(["a"])  # a ended meanwhile: its whole record now
    clock.now += 1
    board.down(RedisUnavailable("gone again"))
    clock.now += 5
    with pytest.raises(RedisUnavailable, match="gone again"):
        w.block_s(board)


def test_a_wait_that_read_nothing_yet_fails_as_soon_as_an_attempt_to_subscribe_fails():
    board = Board()
    board.down(RedisUnavailable("an earlier failure"))
    w = Wait(["a"], reconnect_for=30)
    board.join(w)  # the listener tries again now: its outcome decides
    assert w.task(board) is None and w.block_s(board) > 0
    board.down(RedisUnavailable("cannot reach Redis"))
    assert w.task(board) is None
    with pytest.raises(RedisUnavailable, match="cannot reach"):
        w.block_s(board)


def test_no_read_before_the_subscription_of_a_new_listener():
    board = Board()
    board.up()
    board.gone()  # the listener let its connection go (idle, or the client closed)
    w = Wait(["a"])
    board.join(w)
    assert w.task(board) is None  # a read now could miss the end
    board.up()
    assert w.task(board) == Task(["a"])


def test_timeout_and_a_last_read_when_the_subscription_never_came():
    clock = Clock()
    board = Board(clock)
    w = Wait(["a", "b"], timeout=1.5, clock=clock)
    board.join(w)
    clock.now += 1.5
    last = w.task(board)  # out of time unsubscribed: read once, to return what is final
    assert last == Task(["a", "b"])
    assert [r.service_id for r in w.settle(last, [hashed("running"), hashed("failed")])] == ["b"]
    assert w.task(board) is None
    with pytest.raises(WaitTimeout, match=r"1 service\(s\) not final after 1\.5 s: a"):
        w.block_s(board)


def test_an_id_without_a_record_has_a_grace_then_is_unknown(monkeypatch):
    monkeypatch.setattr(follow_module, "UNKNOWN_GRACE", 3.0)
    clock = Clock()
    board = Board(clock)
    w = Wait(["ghost", "late", "known"], clock=clock)
    board.join(w)
    board.up()
    assert w.settle(w.task(board), [{}, {}, hashed("running")]) == []
    assert w.block_s(board) == 3.0  # wakes when the grace ends
    assert board.hear(note("late", "queued", seq=1)) == []  # late has a record now
    clock.now += 3.0
    overdue = w.task(board)
    assert overdue == Task(["ghost"])  # only those never heard of, once each
    with pytest.raises(UnknownService, match="no service with id 'ghost'"):
        w.settle(overdue, [{}])


def test_a_long_silence_about_the_ids_re_reads_their_states():
    clock = Clock()
    board = Board(clock)
    w = Wait(["a"], clock=clock)
    board.join(w)
    board.up()
    w.settle(w.task(board), [hashed("running")])
    assert w.block_s(board) == QUIET_S
    clock.now += QUIET_S / 2
    board.hear(note("a", "running"))  # news about a: not silent
    clock.now += QUIET_S / 2
    assert w.task(board) is None
    clock.now += QUIET_S / 2
    assert w.task(board) == Task(["a"], states=True)


def test_two_waits_on_one_id_both_hear_its_end():
    board = Board()
    one, two = Wait(["a", "b"]), Wait(["a"])
    board.join(one)
    board.join(two)
    board.up()
    for w in (one, two):
        w.settle(w.task(board), [hashed("running")] * len(w.ids))
    assert board.hear(note("a", "succeeded")) == [one, two]
    board.leave(one)
    assert board.hear(note("a", "succeeded")) == [two]


def test_a_silent_connection_is_pinged_then_given_up(monkeypatch):
    monkeypatch.setattr(listener_module, "PING_S", 10.0)
    clock = Clock()
    live = Liveness(clock)
    clock.now += 9
    assert not live.ping_due()
    clock.now += 1
    assert live.ping_due() and not live.ping_due()  # one PING at a time
    clock.now += 5
    live.heard()  # its answer (or any message)
    clock.now += 9
    assert not live.ping_due()
    clock.now += 1
    assert live.ping_due()
    clock.now += 10
    with pytest.raises(redis.ConnectionError, match="no answer"):
        live.ping_due()


def test_ids_submitted_under_the_subscription_are_not_read_until_final():
    """A wait needs no first read of ids this client submitted while the subscription it
    waits on was already confirmed: every note about them was heard, before the wait too
    (and before the submit's reply)."""
    clock = Clock()
    board = Board(clock)
    board.expect("early")  # not subscribed: such a submit is read as usual
    board.up()
    board.expect("a")
    assert board.hear(note("a", "succeeded")) == []  # before the reply: kept on the board
    board.expect("b")
    board.expect("refused")
    board.forget("refused")  # its submit failed: read as usual
    w = Wait(["a", "b", "c", "early", "refused"], timeout=10, clock=clock)
    board.join(w)
    first = w.task(board)
    assert first == Task(["c", "early", "refused"])
    assert w.settle(first, [hashed("running")] * 3) == []
    assert w.task(board) == Task(["a"])  # final already: its record is read
    assert [r.state for r in w.settle(Task(["a"]), [hashed("succeeded")])] == ["succeeded"]
    assert w.task(board) is None  # b is waited for on the channel alone
    assert board.hear(note("b", "failed")) == [w]
    assert w.task(board) == Task(["b"])


def test_ids_submitted_before_the_subscription_was_lost_are_read_again():
    clock = Clock()
    board = Board(clock)
    board.up()
    board.expect("a")
    board.down(RedisUnavailable("gone"))
    board.expect("b")  # sent while the subscription was being made again
    board.up()
    w = Wait(["a", "b"], timeout=10, clock=clock)
    board.join(w)
    assert w.task(board) == Task(["a", "b"])


def test_a_board_remembers_a_bounded_number_of_submitted_ids(monkeypatch):
    from soaf.client import notes

    monkeypatch.setattr(notes, "FRESH_MAX", 2)
    board = Board(Clock())
    board.up()
    for sid in ("a", "b", "c"):
        board.expect(sid)
    assert board.claim(["a", "b", "c"]) == {"b": False, "c": False}  # a was forgotten
    assert board.claim(["b"]) == {}  # claimed once: a second wait reads it
