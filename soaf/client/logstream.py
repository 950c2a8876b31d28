"""Reading a service's output back from its Redis log stream: the tail, and following it.

The core copies new lines of every program's stdout/stderr into ``Keys.log(id)`` (see
soaf.core.logkeeper); these functions read them on any machine. Following reads the log stream
and the service's event stream in one blocking call, so the end of the service is
noticed without polling, and every line written before the final state is yielded.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis

from soaf.errors import WaitTimeout
from soaf.protocol.keys import Keys
from soaf.protocol.state import FINAL_VALUES, ServiceRecord, decode_event


@dataclass(frozen=True)
class LogLine:
    """One line of a service's output as read back from Redis (``Client.logs``)."""

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


def read_tail(client: redis.Redis, keys: Keys, service_id: str, n: int,
              streams: Iterable[str] | None) -> tuple[list[LogLine], str]:
    """(the last ``n`` lines of the wanted streams, oldest first; the newest entry id or
    "0-0")."""
    wanted = set(streams) if streams is not None else None
    key = keys.log(service_id)
    lines: list[LogLine] = []
    newest = None
    top = "+"
    while len(lines) < n:
        entries = client.xrevrange(key, max=top, min="-", count=max(n, 100))
        if not entries:
            break
        if newest is None:
            newest = entries[0][0].decode()
        for raw_id, fields in entries:
            line = LogLine.from_entry(raw_id, fields)
            if wanted is None or line.stream in wanted:
                lines.append(line)
                if len(lines) >= n:
                    break
        top = f"({entries[-1][0].decode()}"
    if newest is None:
        last = client.xrevrange(key, count=1)
        newest = last[0][0].decode() if last else "0-0"
    lines.reverse()
    return lines, newest


def follow(client: redis.Redis, blocking: redis.Redis, keys: Keys, record: ServiceRecord, *,
           tail: int, streams: Iterable[str] | None, timeout: float | None,
           block_ms: int) -> Iterator[LogLine]:
    """The last ``tail`` lines, then new ones as they come, until the service is final."""
    deadline = None if timeout is None else time.monotonic() + timeout
    sid = record.service_id
    wanted = set(streams) if streams is not None else None
    lines, position = read_tail(client, keys, sid, tail, streams)
    yield from lines
    log_key, ev_key = keys.log(sid), keys.events(sid)
    ev_position = record.raw.get("event_id") or "0-0"
    final = record.final
    while True:
        if final:
            while True:  # everything written before the final state
                entries = client.xrange(log_key, min=f"({position}", count=500)
                if not entries:
                    return
                for raw_id, fields in entries:
                    position = raw_id.decode()
                    line = LogLine.from_entry(raw_id, fields)
                    if wanted is None or line.stream in wanted:
                        yield line
        block = block_ms
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"{sid} not final after {timeout} s")
            block = max(1, min(block, int(left * 1000)))
        resp = blocking.xread({log_key: position, ev_key: ev_position}, block=block, count=500)
        for stream, entries in resp or []:
            is_log = stream.decode() == log_key
            for raw_id, fields in entries:
                if not is_log:
                    ev_position = raw_id.decode()
                    if decode_event(fields).get("state") in FINAL_VALUES:
                        final = True
                    continue
                position = raw_id.decode()
                line = LogLine.from_entry(raw_id, fields)
                if wanted is None or line.stream in wanted:
                    yield line
