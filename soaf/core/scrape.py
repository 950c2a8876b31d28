"""What a core shows Prometheus: its parts wired into soaf.metrics, and the endpoint started.

Imported only when a metrics port is set (``soaf core --metrics-port``), so a core
without the ``metrics`` extra installed runs as before.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import redis

from soaf.config import Settings
from soaf.core.admission import Admission
from soaf.core.replays import added_at
from soaf.core.runtable import RunTable
from soaf.core.writer import StateWriter
from soaf.errors import ConfigError
from soaf.plugin.loader import PluginLoader
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.queues import parse_member, split_ref

if TYPE_CHECKING:
    from soaf.metrics.exporter import CoreMetrics, RunInfo

log = logging.getLogger(__name__)


def serve(address: tuple[str, int], settings: Settings, *, runs: RunTable, writer: StateWriter,
          loader: PluginLoader, admission: Admission, client: redis.Redis) -> CoreMetrics:
    """Serve the core's metrics on ``address`` (host, port); ConfigError when the
    ``metrics`` extra is missing or the address cannot be bound."""
    try:
        from soaf.metrics.exporter import CoreMetrics, Readings, RunInfo
    except ImportError as e:
        raise ConfigError(f"metrics need the prometheus-client library ({e}): "
                          "pip install 'soaf[metrics]'") from e
    keys = Keys(settings.prefix)

    def run_info(service_id: str) -> RunInfo | None:
        run = runs.get(service_id)
        if run is None:
            return None
        return RunInfo(run.template.service, entry_time(keys, run.claim.entry_id))

    readings = Readings(
        node=settings.node, running=lambda: len(runs),
        capacity=lambda: {"max_services": settings.max_services, **admission.usage()},
        backlog=writer.pending, reconnects=lambda: writer.reconnects,
        plugin_version=lambda: loader.current.version if loader.current else None,
        reload_failures=lambda: loader.failures, queues=lambda: queues(client, keys))
    metrics = CoreMetrics(readings, run_info=run_info)
    writer.observe = metrics.observe
    host, port = address
    try:
        metrics.serve(host, port)
    except OSError as e:
        writer.observe = None
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
    return metrics


def entry_time(keys: Keys, entry_ref: str) -> float | None:
    """When an entry (``<queue>/<id>``, or a bare id of the old submit stream) was added."""
    return added_at(split_ref(keys, entry_ref)[1])


def queues(client: redis.Redis, keys: Keys) -> dict[str, tuple[int, int]]:
    """Per queue (and the old submit stream): entries not finished (cores delete finished
    ones) and, of those, entries read by a core (pending in the consumer group)."""
    names = [m.decode(errors="replace") if isinstance(m, bytes) else str(m)
             for m in client.smembers(keys.queues)]
    members = sorted(q for name in names if (q := parse_member(name)) is not None)
    streams = [keys.submit, *(keys.queue(service, priority) for service, priority in members)]
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xlen(stream)
        pipe.xpending(stream, GROUP)
    replies = pipe.execute(raise_on_error=False)
    found: dict[str, tuple[int, int]] = {}
    for stream, total, pending in zip(streams, replies[::2], replies[1::2]):
        if isinstance(total, Exception):
            continue  # not a stream (tampered): nothing to count
        read = int(pending.get("pending") or 0) if isinstance(pending, dict) else 0
        found[stream] = (int(total), read)
    return found
