"""Durable writes: a write counts only once replicas hold it, so a failover keeps it.

Redis replicates asynchronously: a master acknowledges a write before any replica has it,
and a failover right then promotes a replica without it. ``WAIT n timeout``, sent on the
same connection right after the write (one pipeline), returns how many replicas hold
everything that connection wrote. A durable submit (``durable=True`` or
SOAF_DURABLE_SUBMIT=1) returns only when SOAF_DURABLE_REPLICAS replicas (default 1)
confirmed it; a core with the same setting counts a final state as written only then,
and otherwise keeps and re-sends it (soaf.core.writer).
"""

from __future__ import annotations

import os

from soaf.errors import ConfigError, NotReplicated

#: Replicas a durable write waits for when SOAF_DURABLE_REPLICAS is not set.
DEFAULT_REPLICAS = 1
#: Milliseconds one WAIT may block; a client then raises NotReplicated, a core re-sends.
WAIT_MS = 5000


def replicas(durable: bool | None = None) -> int:
    """How many replicas a write must reach: 0 when not durable. ``durable`` None means
    SOAF_DURABLE_SUBMIT decides; SOAF_DURABLE_REPLICAS says how many (default 1)."""
    if durable is None:
        durable = os.environ.get("SOAF_DURABLE_SUBMIT", "").strip().lower() in ("1", "true", "yes")
    if not durable:
        return 0
    raw = os.environ.get("SOAF_DURABLE_REPLICAS", "").strip()
    if not raw:
        return DEFAULT_REPLICAS
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"SOAF_DURABLE_REPLICAS must be a whole number >= 1, got {raw!r}")
    return int(raw)


def confirmed(acked: int, wanted: int, what: str) -> None:
    """Raise NotReplicated unless ``acked`` (WAIT's reply) reaches ``wanted``."""
    if acked < wanted:
        raise NotReplicated(
            f"{what} is on the Redis master, but only {acked} of {wanted} replica(s) "
            f"confirmed it within {WAIT_MS / 1000:g} s, so a failover could lose it; "
            "check the replicas (INFO replication), then repeat the call (it is safe)")
