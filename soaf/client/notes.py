"""Waiting for services' final states on the notify channel: the I/O-free part.

Every change of a record publishes a short note (``{id, seq, state?}``) on the notify
channel (see soaf/protocol/scripts/records.py), a final state included. So a client
subscribes once (one connection, kept while it waits, shared by all its waits) and each
wait (``wait``, ``wait_all``, ``as_completed``) reads records only when it must:

* once at the start, after the subscription is confirmed: a record that ends after the
  read sends a note that is heard, one that ended before is final in the read; not at
  all for an id the client submitted while the same subscription was confirmed already
  (every note about it was heard: the board kept the final ones);
* once per id whose final note came, to return its final record;
* once more for the ids still pending after the subscription was made again (pub/sub
  drops the notes sent while a connection is down), or after a long silence about them;
* once for an id that had no record and whose grace ran out (``UNKNOWN_GRACE``).

``Board`` hands the notes the subscription hears to the waits that want them; ``Wait``
is one wait's bookkeeping. ``soaf.client.listener`` holds the subscription (a thread for
``Client``, a task for ``AsyncClient``); the clients read the records.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from soaf.client import follow
from soaf.client.calls import unknown
from soaf.errors import RedisUnavailable, StateError
from soaf.protocol.keys import Keys
from soaf.protocol.state import FINAL_VALUES, ServiceRecord

#: Seconds without a word about a wait's ids after which it re-reads their states once
#: more (a safety net, not the way waits learn: that costs one read per pending id per
#: this period).
QUIET_S = 60.0
#: Records read per pipelined round trip.
READ_CHUNK = 1000
#: Ids submitted under the current subscription that a board remembers (the oldest are
#: forgotten first: a wait for them then reads their records, as for any other id).
FRESH_MAX = 100_000


@dataclass(frozen=True)
class Task:
    """Ids whose records (``states=False``: whole records) or states (``states=True``:
    the ``state`` field only) a wait must read now, in this order."""

    ids: list[str]
    states: bool = False


class Wait:
    """One wait on ``ids``: what is pending, what was heard, what to read next, and how
    long to block until then."""

    def __init__(self, ids: Iterable[str], *, timeout: float | None = None,
                 reconnect_for: float = 0.0, clock: Any = time.monotonic) -> None:
        self.ids = follow.unique(ids)
        self.pending = set(self.ids)
        self.timeout = timeout
        self.reconnect_for = reconnect_for
        self._clock = clock
        self.started = clock()
        self.deadline = None if timeout is None else self.started + timeout
        self.noted: dict[str, None] = {}  # final notes heard, in order; records not read yet
        self.missing: dict[str, float] = {}  # ids without a record -> end of their grace
        self.read = False  # whether the records were read once: then outages are ridden out
        self.epoch = 0  # the subscription the last full read came after
        self.failures_before = 0  # the board's failed attempts when the wait joined it
        self._heard_at = self.started

    def hear(self, service_id: str, state: Any) -> bool:
        """A note about ``service_id``; True when the wait has records to read now."""
        self._heard_at = self._clock()
        self.missing.pop(service_id, None)  # it has a record now
        if state in FINAL_VALUES and service_id in self.pending:
            self.noted[service_id] = None
            return True
        return False

    def task(self, board: Board) -> Task | None:
        """What to read now; None when there is nothing to do but wait (``block_s``)."""
        now = self._clock()
        if not board.live:
            # Records read now could miss a note: wait for the subscription. A wait that
            # runs out of time first still reads them once, to return what is final.
            if not self.read and self.deadline is not None and now >= self.deadline:
                self.read = True
                return Task(self._still())
            return None
        if self.epoch != board.epoch:  # the start, or a new subscription after an outage
            again, self.read, self.epoch, self._heard_at = self.read, True, board.epoch, now
            self.noted.clear()
            if again:
                return Task(self._still(), states=True)
            # Ids submitted under this very subscription: every note about them was heard.
            fresh = board.claim(self._still())
            self.noted = {sid: None for sid, final in fresh.items() if final}
            if rest := [sid for sid in self._still() if sid not in fresh]:
                return Task(rest)
        ids, self.noted = [i for i in self.noted if i in self.pending], {}
        if ids:
            return Task(ids)
        if overdue := [sid for sid, at in self.missing.items() if at <= now]:
            return Task(overdue)
        if now - self._heard_at >= QUIET_S:
            self._heard_at = now
            return Task(self._still(), states=True)
        return None

    def _still(self) -> list[str]:
        return [i for i in self.ids if i in self.pending]

    def block_s(self, board: Board) -> float:
        """How long to block before the next ``task``: WaitTimeout once the wait's time is
        up, RedisUnavailable once the subscription was lost for longer than
        ``reconnect_for`` (for a wait that has read nothing yet, as soon as an attempt to
        subscribe failed after it began)."""
        now: float = self._clock()
        wake = [self._heard_at + QUIET_S, *self.missing.values()]
        if board.down_since is not None:
            if (self.read and now - board.down_since >= self.reconnect_for) or (
                    not self.read and board.failures > self.failures_before):
                raise (copy.copy(board.error) if board.error is not None
                       else RedisUnavailable("the notify channel is unreachable"))
            wake.append(board.down_since + self.reconnect_for)
        if self.deadline is not None:
            if self.read and now >= self.deadline:
                raise follow.timed_out(self._still(), self.timeout)
            wake.append(self.deadline)
        return max(0.0, float(min(wake) - now))

    def settle(self, task: Task, replies: list[Any]) -> list[ServiceRecord]:
        """The final records among the replies to ``task`` (yielded in its order); ids
        whose state is final are noted, for their records to be read next. An id with
        no record is unknown (UnknownService) once its grace is over."""
        now, done = self._clock(), []
        for sid, reply in zip(task.ids, replies):
            if sid not in self.pending:
                continue
            if task.states:
                state = None if reply is None else _state(reply)
            else:  # the whole record is parsed only once it is final
                state = None if not reply else _state(reply.get(b"state", b'"unknown"'))
            if state is None:  # no record (yet)
                grace = self.missing.setdefault(sid, self.started + follow.UNKNOWN_GRACE)
                if grace <= now:
                    raise unknown(sid)
                continue
            self.missing.pop(sid, None)
            if not isinstance(state, str) or state not in FINAL_VALUES:
                continue
            if task.states:
                self.noted[sid] = None
            else:
                self.pending.discard(sid)
                done.append(ServiceRecord.from_hash(sid, reply))
        return done


def _state(raw: bytes) -> Any:
    """A record's state as stored (a JSON text; Redis is not trusted: anything else is
    no final state)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class Board:
    """The subscription's side: which waits want notes about which ids, and how the
    subscription stands. ``live``: confirmed and not known to be lost; ``epoch`` counts
    the subscriptions confirmed so far, so a wait can tell that notes may have been missed
    since it last read; ``failures`` counts the attempts that failed."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        #: Ids this client submitted under the current subscription (emptied whenever it
        #: ends or is made again), and whether a final note was heard about them since.
        self._fresh: dict[str, bool] = {}
        self.live = False
        self.epoch = 0
        self.failures = 0
        self.down_since: float | None = None
        self.error: StateError | None = None
        self.waits: list[Wait] = []
        self._by_id: dict[str, list[Wait]] = {}

    def join(self, wait: Wait) -> None:
        wait.failures_before = self.failures
        self.waits.append(wait)
        for sid in wait.ids:
            self._by_id.setdefault(sid, []).append(wait)

    def leave(self, wait: Wait) -> None:
        self.waits.remove(wait)
        for sid in wait.ids:
            others = [w for w in self._by_id.pop(sid, []) if w is not wait]
            if others:
                self._by_id[sid] = others

    def up(self) -> list[Wait]:
        """The subscription is confirmed: every wait has to read (again)."""
        self.live, self.epoch = True, self.epoch + 1
        self.down_since, self.error = None, None
        self._fresh.clear()
        return list(self.waits)

    def down(self, error: StateError) -> list[Wait]:
        """An attempt to subscribe failed, or the subscription was lost (notes are being
        missed); the waits to wake."""
        if self.down_since is None:
            self.down_since = self._clock()
        self.live, self.error, self.failures = False, error, self.failures + 1
        self._fresh.clear()
        return list(self.waits)

    def gone(self) -> None:
        """The listener let its connection go (no wait, or the client closed): the next
        one starts afresh."""
        self.live, self.down_since, self.error = False, None, None
        self._fresh.clear()

    def hear(self, data: Any) -> list[Wait]:
        """A note from the channel; the waits that have records to read because of it."""
        if not self._by_id and not self._fresh:
            return []
        try:
            note = json.loads(data)
        except (ValueError, TypeError):
            return []  # Redis is not trusted: anyone can publish on the channel
        if not isinstance(note, dict) or not isinstance(note.get("id"), str):
            return []
        sid, state = note["id"], note.get("state")
        state = state if isinstance(state, str) else None
        if state in FINAL_VALUES and sid in self._fresh:
            self._fresh[sid] = True
        return [w for w in self._by_id.get(sid, ()) if w.hear(sid, state)]

    def expect(self, service_id: str) -> None:
        """A submit of ``service_id`` is about to be sent: under a confirmed subscription,
        every note about it will be heard (those that come before the submit's reply
        too), so the notes are kept and a wait for it need not read its record first."""
        if not self.live:
            return
        if len(self._fresh) >= FRESH_MAX:  # a client that submits and never waits
            del self._fresh[next(iter(self._fresh))]
        self._fresh[service_id] = False

    def forget(self, service_id: str) -> None:
        """The submit of ``service_id`` failed (or may not have gone through): a wait
        for it reads its record as for any other id."""
        self._fresh.pop(service_id, None)

    def claim(self, ids: Iterable[str]) -> dict[str, bool]:
        """Of ``ids``, those submitted under the current subscription (forgotten here:
        they are the caller's now), each with whether its final note was heard."""
        found: dict[str, bool] = {}
        for sid in ids:
            if (final := self._fresh.pop(sid, None)) is not None and self.live:
                found[sid] = final
        return found


def queue_reads(pipe: Any, keys: Keys, ids: list[str], *, states: bool) -> None:
    """Queue on ``pipe`` the reads of ``ids`` a task asks for: each whole record
    (HGETALL), or only its ``state`` (HGET)."""
    for sid in ids:
        if states:
            pipe.hget(keys.service(sid), "state")
        else:
            pipe.hgetall(keys.service(sid))


def chunks(ids: list[str]) -> Iterable[list[str]]:
    """``ids`` in pieces of READ_CHUNK, one pipelined round trip each."""
    return (ids[i:i + READ_CHUNK] for i in range(0, len(ids), READ_CHUNK))
