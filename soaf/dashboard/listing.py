"""Pages of services, newest first, that stay fast however many records Redis holds.

The index is ``soaf:services``, a sorted set scored by submit time (soaf.protocol.keys):
a page reads a range of it by rank and the few fields a row shows (HMGET, one pipeline),
never the whole set. A cursor names the last id shown and its score, so the next page
starts right after it (found again by rank; by score if it has expired meanwhile).
Filters (state, service, node) are applied to the rows read, in chunks, and a page stops
after ``SCAN_BUDGET`` records even if it is not full: its ``next`` cursor goes on from
there, and ``scanned`` says how far it looked, so a rare state never costs a full scan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio

from soaf.protocol.keys import Keys

#: The record fields a row of the services list shows (and live updates carry).
ROW_FIELDS = ("service", "state", "node", "progress", "message", "attempt", "submitted_at",
              "running_at", "finished_at", "error", "waiting_for")
#: What a filter looks at in every record it passes.
FILTER_FIELDS = ("state", "service", "node")
#: Rows per page unless asked otherwise, and the most a page may have.
PAGE_SIZE = 50
MAX_PAGE = 500
#: Ids read per round trip while filtering.
CHUNK = 500
#: Records a filtered page looks at before it returns what it found.
SCAN_BUDGET = 5000


@dataclass
class Page:
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: Cursor of the next page (None: this is the last).
    next: str | None = None
    #: Records looked at to fill this page.
    scanned: int = 0
    #: Services in the index (all, not only those matching).
    total: int = 0


@dataclass(frozen=True)
class Filters:
    state: str | None = None
    service: str | None = None
    node: str | None = None

    @property
    def active(self) -> bool:
        return any((self.state, self.service, self.node))

    def match(self, row: dict[str, Any]) -> bool:
        return ((not self.state or row.get("state") == self.state)
                and (not self.service or row.get("service") == self.service)
                and (not self.node or row.get("node") == self.node))


def row_from(service_id: str, values: list[bytes | None],
             fields: tuple[str, ...] = ROW_FIELDS) -> dict[str, Any]:
    """A row from an HMGET of ``fields`` (every record value is JSON)."""
    row: dict[str, Any] = {"service_id": service_id}
    for name, raw in zip(fields, values):
        try:
            row[name] = json.loads(raw) if raw is not None else None
        except ValueError:
            row[name] = raw.decode(errors="replace") if raw is not None else None
    return row


def parse_cursor(cursor: str | None) -> tuple[float, str] | None:
    """``(score, id)`` of a cursor made by ``make_cursor``; None for none or a bad one."""
    if not cursor:
        return None
    score, sep, sid = cursor.partition(":")
    try:
        return (float(score), sid) if sep and sid else None
    except ValueError:
        return None


def make_cursor(score: float, service_id: str) -> str:
    return f"{score!r}:{service_id}"


async def rows_of(r: redis.asyncio.Redis, keys: Keys, ids: list[str],
                  fields: tuple[str, ...] = ROW_FIELDS) -> list[dict[str, Any]]:
    """The rows of ``ids`` (None values for an id whose record expired)."""
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for sid in ids:
        pipe.hmget(keys.service(sid), list(fields))
    return [row_from(sid, values, fields) for sid, values in zip(ids, await pipe.execute())]


async def _start(r: redis.asyncio.Redis, keys: Keys, cursor: tuple[float, str] | None) -> int:
    """The rank (newest first) the page after ``cursor`` starts at."""
    if cursor is None:
        return 0
    score, sid = cursor
    rank: Any = await r.zrevrank(keys.services, sid)
    if rank is not None:
        return int(rank) + 1
    # The cursor's id expired: start with the first id older than its score.
    return int(await r.zcount(keys.services, score, "+inf"))


async def page(r: redis.asyncio.Redis, keys: Keys, filters: Filters, *,
               cursor: str | None = None, size: int = PAGE_SIZE) -> Page:
    """One page of rows, newest first, from after ``cursor``. While filtering, only the
    fields filtered on are read for every record looked at; whole rows for the matches."""
    size = max(1, min(size, MAX_PAGE))
    result = Page(total=int(await r.zcard(keys.services)))
    start = await _start(r, keys, parse_cursor(cursor))
    chunk = CHUNK if filters.active else size
    while len(result.rows) < size and result.scanned < SCAN_BUDGET:
        found: Any = await r.zrevrange(keys.services, start, start + chunk - 1, withscores=True)
        ids = [raw.decode() for raw, _ in found]
        probe = await rows_of(r, keys, ids, FILTER_FIELDS if filters.active else ROW_FIELDS)
        kept: list[dict[str, Any]] = []
        result.next = None  # unless this chunk shows there is more
        for (_, score), row in zip(found, probe):
            result.scanned += 1
            start += 1
            if row["state"] is not None and filters.match(row):
                kept.append(row)
            if len(result.rows) + len(kept) >= size or result.scanned >= SCAN_BUDGET:
                result.next = make_cursor(score, row["service_id"])
                break
        else:
            if len(found) == chunk:
                result.next = make_cursor(found[-1][1], ids[-1])
        if filters.active and kept:
            kept = await rows_of(r, keys, [row["service_id"] for row in kept])
        result.rows += kept
        if len(found) < chunk:
            break  # the end of the index
    if result.next is not None and start >= result.total:
        result.next = None
    return result
