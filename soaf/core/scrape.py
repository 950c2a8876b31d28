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
from soaf.core.runtable import RunTable
from soaf.core.writer import StateWriter
from soaf.errors import ConfigError
from soaf.plugin.loader import PluginLoader
from soaf.protocol.keys import GROUP, Keys

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
        return RunInfo(run.template.service, entry_time(run.claim.entry_id))

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


def entry_time(entry_id: str) -> float | None:
    """When a submit-stream entry was added (its id is milliseconds, then a sequence)."""
    head = entry_id.partition("-")[0]
    return int(head) / 1000.0 if head.isdigit() else None


def queues(client: redis.Redis, keys: Keys) -> dict[str, tuple[int, int]]:
    """Per submit stream: entries not finished (cores delete finished ones) and, of
    those, entries read by a core (pending in the consumer group)."""
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.submit)
    pipe.xpending(keys.submit, GROUP)
    total, pending = pipe.execute(raise_on_error=False)
    if isinstance(total, Exception):
        raise total
    read = 0 if isinstance(pending, Exception) else int(pending.get("pending") or 0)
    return {keys.submit: (int(total), read)}
