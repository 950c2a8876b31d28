"""Redis replies, in the shapes soaf reads them: stream entries, hashes, names.

redis-py types its replies as broadly as every connection option allows (bytes or str,
RESP2 or RESP3). soaf's connections always return bytes (no ``decode_responses``), so
each reply shape is turned into precise types here, once, instead of at every caller.
"""

from __future__ import annotations

from typing import Any

#: One stream entry: its id and its fields.
Entry = tuple[str, dict[bytes, bytes]]
#: One pending entry: its fields are None once it was deleted from the stream.
Pending = tuple[str, "dict[bytes, bytes] | None"]


def text(value: Any) -> str:
    """A name or id as redis-py returns it (bytes, or str on a decoding connection)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def pending(batch: Any) -> list[Pending]:
    """The entries of one stream, from an XRANGE/XCLAIM-style list; an entry deleted
    from the stream but still pending has fields None."""
    return [(text(item[0]), None if item[1] is None else dict(item[1]))
            for item in batch or [] if item]


def entries(batch: Any) -> list[Entry]:
    """The entries of one stream (a deleted one has no fields)."""
    return [(entry_id, fields or {}) for entry_id, fields in pending(batch)]


def stream_batch(resp: Any) -> Any:
    """The list of entries of the single stream an XREAD/XREADGROUP reply is about."""
    if not resp:
        return []
    if isinstance(resp, dict):  # RESP3
        return next(iter(resp.values()), [])
    return resp[0][1]


def stream_entries(resp: Any) -> list[Entry]:
    """The entries of the single stream an XREAD/XREADGROUP reply is about."""
    return entries(stream_batch(resp))


def hash_of(data: Any) -> dict[bytes, bytes]:
    """An HGETALL reply."""
    return dict(data or {})
