"""Reading a service's output back from its Redis log stream: the bookkeeping, without I/O.

The core copies new lines of every program's stdout/stderr into ``Keys.log(id)`` (see
soaf.core.logkeeper), keeping the newest ``SOAF_LOG_LINES`` of them; a client on any
machine reads them there. ``TailRead`` pages backwards through the stream for the last
lines; ``LogFollow`` reads the log stream and the service's event stream in one
blocking call, so the end of the service is noticed without polling and every line
written before the final state is yielded. ``Client`` and ``AsyncClient`` only send
the reads these ask for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from soaf.client.follow import BLOCK_MS, READ_COUNT, Resp
from soaf.errors import WaitTimeout
from soaf.protocol.keys import Keys
from soaf.protocol.state import FINAL_VALUES, ServiceRecord, decode_events

#: The streams a service's log stream holds: the program's two, and soaf's own notes
#: (e.g. how much of a flood was not copied).
LOG_STREAMS = ("stdout", "stderr", "soaf")

Entries = list[tuple[bytes, dict[bytes, bytes]]]


@dataclass(frozen=True)
class LogLine:
    """One line of a service's output as read back from Redis (``Client.log_lines``)."""

    stream: str  # "stdout", "stderr", or "soaf" for soaf's own notes
    text: str
    attempt: int
    ts: float  # when soaf copied it (from the stream entry id)
    entry_id: str = ""

    def __str__(self) -> str:
        return self.text

    @classmethod
    def from_entry(cls, entry_id: bytes, fields: dict[bytes, bytes]) -> LogLine:
        eid = entry_id.decode()
        try:
            attempt = int(fields.get(b"a", b"0"))
        except ValueError:
            attempt = 0
        return cls(
            stream=fields.get(b"s", b"").decode(errors="replace"),
            text=fields.get(b"l", b"").decode(errors="replace"),
            attempt=attempt,
            ts=int(eid.split("-", 1)[0]) / 1000,
            entry_id=eid,
        )


def wanted_streams(streams: Iterable[str] | None) -> frozenset[str] | None:
    """The stream names asked for (None: all); ValueError naming an unknown one."""
    if streams is None:
        return None
    wanted = frozenset([streams] if isinstance(streams, str) else streams)
    if bad := sorted(wanted - set(LOG_STREAMS)):
        raise ValueError(f"streams must be among {', '.join(LOG_STREAMS)}, got {bad[0]!r}")
    return wanted


class TailRead:
    """The last ``n`` lines (None: every line Redis has) of the wanted streams.

    The shell calls XREVRANGE with ``(max, count)`` from ``request()`` until it says
    None, passing each reply to ``feed``. Then ``lines`` holds the lines, oldest first,
    and ``newest`` the newest entry id of the whole stream ("0-0" when it is empty, that
    is, when Redis has no copy of the service's output)."""

    def __init__(self, n: int | None, streams: Iterable[str] | None) -> None:
        self.n = n
        self.wanted = wanted_streams(streams)
        self._lines: list[LogLine] = []
        self._newest: str | None = None
        self._top = "+"
        self._done = False

    def request(self) -> tuple[str, int] | None:
        if self._done:
            return None
        if self.n == 0:  # no lines; only where the stream ends
            return self._top, 1
        return self._top, READ_COUNT if self.n is None else max(self.n, 100)

    def feed(self, entries: Entries) -> None:
        if not entries:
            self._done = True
            return
        if self._newest is None:
            self._newest = entries[0][0].decode()
        if self.n == 0:
            self._done = True
            return
        for raw_id, fields in entries:
            line = LogLine.from_entry(raw_id, fields)
            if self.wanted is None or line.stream in self.wanted:
                self._lines.append(line)
                if self.n is not None and len(self._lines) >= self.n:
                    self._done = True
                    return
        self._top = f"({entries[-1][0].decode()}"

    @property
    def lines(self) -> list[LogLine]:
        return self._lines[::-1]

    @property
    def newest(self) -> str:
        return self._newest or "0-0"


class LogFollow:
    """Following one service's log stream from ``position`` until the service is final.

    While ``final`` is False the shell blocks on XREAD ``streams()`` for ``block_ms()``
    and passes the reply to ``feed``; once it is True, it reads what is left with
    XRANGE ``(log_key, after())`` until a reply is empty, passing each to
    ``feed_log``. WaitTimeout from ``block_ms`` once ``timeout`` has passed."""

    def __init__(self, keys: Keys, record: ServiceRecord, *, position: str,
                 streams: Iterable[str] | None, timeout: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.service_id = record.service_id
        self.log_key = keys.log(record.service_id)
        self.events_key = keys.events(record.service_id)
        self.position = position
        self.events_position = str(record.raw.get("event_id") or "0-0")
        self.final = record.final
        self.wanted = wanted_streams(streams)
        self.timeout = timeout
        self._clock = clock
        self.deadline = None if timeout is None else clock() + timeout

    def streams(self) -> dict[str, str]:
        return {self.log_key: self.position, self.events_key: self.events_position}

    def block_ms(self) -> int:
        if self.deadline is None:
            return BLOCK_MS
        left = self.deadline - self._clock()
        if left <= 0:
            raise WaitTimeout(f"{self.service_id} not final after {self.timeout:g} s")
        return max(1, min(BLOCK_MS, int(left * 1000)))

    def after(self) -> str:
        return f"({self.position}"

    def feed(self, resp: Resp) -> list[LogLine]:
        out: list[LogLine] = []
        for raw_key, entries in resp or []:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            if key == self.log_key:
                out += self.feed_log(entries)
                continue
            for raw_id, fields in entries:
                self.events_position = raw_id.decode()
                if any(e.get("state") in FINAL_VALUES for e in decode_events(fields)):
                    self.final = True
        return out

    def feed_log(self, entries: Entries) -> list[LogLine]:
        out: list[LogLine] = []
        for raw_id, fields in entries:
            self.position = raw_id.decode()
            line = LogLine.from_entry(raw_id, fields)
            if self.wanted is None or line.stream in self.wanted:
                out.append(line)
        return out
