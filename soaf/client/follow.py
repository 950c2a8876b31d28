"""Following services' event streams without gap or duplicate: the I/O-free part.

``Client`` and ``AsyncClient`` both follow services the same way and differ only in
how they talk to Redis, so the bookkeeping lives here: where each stream is read from,
how long one blocking read may last, when an id that has no record counts as unknown,
and when the whole wait has run out of time.

A service is followed from a position in its event stream: the ``event_id`` stored in
its record (the newest event when the record was read, so nothing after the read is
missed) or ``0-0`` to replay every event. Each read continues after the last entry
seen, so replay and live reading are one stream read: no gap, no duplicate.

Waiting for services' final states (``wait``, ``wait_all``, ``as_completed``) does not
read streams: it rides on the notify channel (soaf.client.notes).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from soaf.errors import UnknownService, WaitTimeout
from soaf.protocol.keys import Keys
from soaf.protocol.state import FINAL_VALUES, ServiceRecord, decode_events

#: Longest single blocking read, in milliseconds; a wait is made of such reads.
BLOCK_MS = 2000
#: Seconds an id without a record may take to appear before it counts as unknown. A
#: ``Client.submit`` creates the record at once; a submission pushed with plain
#: redis-py gets its record only when a core takes it.
UNKNOWN_GRACE = 5.0
#: Entries read from one stream per round trip.
READ_COUNT = 500

Resp = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None


class Follow:
    """Positions and deadlines of one wait over several services' event streams."""

    def __init__(self, keys: Keys, *, timeout: float | None = None,
                 clock: Any = time.monotonic) -> None:
        self.keys = keys
        self.timeout = timeout
        self._clock = clock
        self.deadline = None if timeout is None else clock() + timeout
        self.positions: dict[str, str] = {}
        self._by_key: dict[str, str] = {}
        self._unknown: dict[str, float] = {}  # id -> when it counts as unknown

    # -- what to follow -------------------------------------------------------------------

    def add(self, service_id: str, record: ServiceRecord | None, *, replay: bool = False) -> bool:
        """Follow ``service_id`` from ``record``'s position (or from the start).

        Returns False, following nothing, when the record is already final and no
        replay was asked for: there is nothing left to wait for.
        """
        if record is not None and record.final and not replay:
            return False
        position = "0-0"
        if record is None:
            self._unknown[service_id] = self._clock() + UNKNOWN_GRACE
        elif not replay:
            position = str(record.raw.get("event_id") or "0-0")
        self.positions[service_id] = position
        self._by_key[self.keys.events(service_id)] = service_id
        return True

    @property
    def active(self) -> bool:
        return bool(self.positions)

    def streams(self) -> dict[str, str]:
        """XREAD's ``streams`` argument for the next read."""
        return {self.keys.events(sid): pos for sid, pos in self.positions.items()}

    def block_ms(self) -> int:
        """How long the next read may block; WaitTimeout once the deadline has passed."""
        now = self._clock()
        limit = BLOCK_MS / 1000
        if self.deadline is not None:
            left = self.deadline - now
            if left <= 0:
                raise timed_out(list(self.positions), self.timeout)
            limit = min(limit, left)
        if self._unknown:
            limit = min(limit, max(0.0, min(self._unknown.values()) - now))
        return max(1, int(limit * 1000))

    # -- what was read ----------------------------------------------------------------------

    def feed(self, resp: Resp) -> list[tuple[str, dict[str, Any]]]:
        """Record the positions of an XREAD reply; return ``(id, event)`` in stream order.

        A service whose final event is in the reply is no longer followed.
        """
        out: list[tuple[str, dict[str, Any]]] = []
        for raw_key, entries in resp or []:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            sid = self._by_key.get(key)
            if sid is None or sid not in self.positions:
                continue
            self._unknown.pop(sid, None)
            for raw_id, data in entries:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                self.positions[sid] = entry_id
                final = False
                for event in decode_events(data):
                    event["event_id"] = entry_id
                    out.append((sid, event))
                    if event.get("state") in FINAL_VALUES:
                        final = True
                        break
                if final:
                    self.positions.pop(sid, None)
                    break
        return out

    def overdue(self) -> list[str]:
        """Ids still without any event whose grace has run out: check whether they exist."""
        now = self._clock()
        return [sid for sid, at in self._unknown.items() if at <= now]

    def resolve(self, service_id: str, exists: bool) -> None:
        """After ``overdue``: keep following an id that exists, raise for one that does not."""
        if exists:
            self._unknown.pop(service_id, None)
            return
        raise UnknownService(f"no service with id {service_id!r}")


def unique(ids: Iterable[str]) -> list[str]:
    """``ids`` without repeats, in their first order; a lone string is one id."""
    if isinstance(ids, str):
        return [ids]
    return list(dict.fromkeys(ids))


def is_final(event: dict[str, Any]) -> bool:
    return event.get("state") in FINAL_VALUES


def timed_out(pending: list[str], timeout: float | None) -> WaitTimeout:
    """The WaitTimeout of a wait whose ``pending`` ids are not final after ``timeout``."""
    return WaitTimeout(f"{len(pending)} service(s) not final after {timeout:g} s: "
                       + ", ".join(pending[:5]) + (" ..." if len(pending) > 5 else ""))
