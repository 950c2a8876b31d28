"""The result cache seen from a client: which runs answer which keys, and forgetting them.

Only cores write entries (signed; see soaf/core/results.py); a client lists them and
deletes them. Deleting an entry never touches the run or its outputs: later templates
with that key simply run again. A plugin change needs no clearing: the plugin's digest
is part of every key, so old entries just stop matching.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from soaf.client.sync import Client


def cache_entries(client: Client, service: str | None = None) -> list[dict[str, Any]]:
    """``{service, key, service_id, at, state}`` per entry (of one service, or all),
    newest first; ``state`` is the run's state now (``gone`` when its record is)."""
    services = [service] if service else sorted(
        m.decode() for m in client._call(client.redis.smembers, client.keys.caches))
    rows: list[dict[str, Any]] = []
    for name in services:
        for key, raw in client._call(client.redis.hgetall, client.keys.cache(name)).items():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                rows.append({"service": name, "key": key.decode(), "service_id": entry["id"],
                             "at": entry.get("at")})
    pipe = client.redis.pipeline(transaction=False)
    for row in rows:
        pipe.hget(client.keys.service(row["service_id"]), "state")
    for row, state in zip(rows, client._call(pipe.execute) if rows else []):
        row["state"] = json.loads(state) if state else "gone"
    return sorted(rows, key=lambda r: -(r["at"] or 0))


def clear_cache(client: Client, service: str | None = None) -> int:
    """Forget the entries of ``service`` (or of every service); how many there were."""
    services = [service] if service else sorted(
        m.decode() for m in client._call(client.redis.smembers, client.keys.caches))
    count = 0
    for name in services:
        pipe = client.redis.pipeline(transaction=True)
        pipe.hlen(client.keys.cache(name))
        pipe.delete(client.keys.cache(name))
        pipe.srem(client.keys.caches, name)
        count += client._call(pipe.execute)[0]
    return count
