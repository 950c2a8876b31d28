"""CoreMetrics: one core's Prometheus metrics and the HTTP endpoint that serves them.

Counts and durations come from ``observe``, which sees every state change the core
queues for Redis (soaf.core.writer): a service whose program started, a service that
ended and how, the time from submit to start and from start to end, each callback error.
Levels (running services, capacity, the writer's backlog, pending work per queue, the
plugin version) are read from the core's parts at scrape time through ``Readings``, so
they are exact when scraped and cost nothing in between.

Metric names (all with the prefix ``soaf_``) are documented in README.md, Metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from soaf.protocol.state import FINAL_VALUES, Change

log = logging.getLogger(__name__)

#: Seconds: bucket bounds of the queue wait and run time histograms (1 ms to 1 day).
BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400,
           86400, float("inf"))
#: Label value for a service whose name the core does not know (a refused entry).
UNKNOWN = "unknown"


@dataclass(frozen=True)
class RunInfo:
    """What metrics need of a service a core runs: its name and when it was submitted."""

    service: str
    submitted_at: float | None


@dataclass(frozen=True)
class Readings:
    """The core's parts, read when Prometheus scrapes; every one a callable."""

    node: str
    #: Services running now.
    running: Callable[[], int]
    #: Capacity and use: ``max_services``, ``cpus``, ``cpus_used``, ``memory_mb``,
    #: ``memory_mb_used``, ``waiting`` (None values are left out).
    capacity: Callable[[], dict[str, Any]]
    #: State changes queued for Redis and not yet written.
    backlog: Callable[[], int]
    #: Times the connection to Redis came back after it was lost.
    reconnects: Callable[[], int]
    #: The plugin version serving (None: none loaded).
    plugin_version: Callable[[], str | None]
    #: Plugin loads that failed since the core started.
    reload_failures: Callable[[], int]
    #: Per queue (stream key): entries not finished, and those of them read by a core.
    queues: Callable[[], dict[str, tuple[int, int]]]


class CoreMetrics:
    """The metrics of one core: feed ``observe``, then ``serve`` them over HTTP."""

    def __init__(self, readings: Readings, *, run_info: Callable[[str], RunInfo | None]) -> None:
        self.registry = CollectorRegistry()
        self._run_info = run_info
        self._lock = threading.Lock()
        self._running_since: dict[tuple[str, int], float] = {}
        self._server: Any = None
        r = self.registry
        self.started = Counter("soaf_services_started", "Attempts whose program started, by "
                               "service.", ["service"], registry=r)
        self.finished = Counter("soaf_services_finished", "Services that reached a final state "
                                "on this core, by service and state.", ["service", "state"],
                                registry=r)
        self.queue_wait = Histogram("soaf_queue_wait_seconds", "Seconds from submit to the "
                                    "start of the first attempt's program, by service.",
                                    ["service"], buckets=BUCKETS, registry=r)
        self.run_time = Histogram("soaf_run_seconds", "Seconds from an attempt's program start "
                                  "to the service's final state, by service.", ["service"],
                                  buckets=BUCKETS, registry=r)
        self.callback_errors = Counter("soaf_callback_errors", "Exceptions raised by watcher "
                                       "handler callbacks, by service.", ["service"], registry=r)
        r.register(_Levels(readings))

    def observe(self, change: Change) -> None:
        """Count what ``change`` says; never raises (it runs in the caller's thread)."""
        try:
            self._observe(change)
        except Exception:  # metrics must never cost a state change
            log.exception("metrics: cannot observe a change of %s", change.service_id)

    def _observe(self, change: Change) -> None:
        values = change.values
        state = values.get("state")
        if state is None and "callback_error" not in values:
            return
        info = self._run_info(change.service_id)
        service = info.service if info else str(values.get("service") or UNKNOWN)
        if "callback_error" in values:
            self.callback_errors.labels(service).inc()
        key = (change.service_id, change.attempt)
        if state == "running":
            self.started.labels(service).inc()
            with self._lock:
                self._running_since[key] = change.ts
            if change.attempt == 1 and info is not None and info.submitted_at is not None:
                self.queue_wait.labels(service).observe(max(0.0, change.ts - info.submitted_at))
        elif state in FINAL_VALUES or state == "queued":  # final, or put back by a stop
            with self._lock:
                since = self._running_since.pop(key, None)
                for stale in [k for k in self._running_since if k[0] == change.service_id]:
                    del self._running_since[stale]  # earlier attempts of this service
            if state == "queued":
                return
            self.finished.labels(service, state).inc()
            if since is not None:
                self.run_time.labels(service).observe(max(0.0, change.ts - since))

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: any free port) in a daemon thread;
        return the port. OSError when the address is taken."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound: int = self._server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Levels(Collector):
    """The gauges read at scrape time; one that cannot be read is left out of the scrape."""

    def __init__(self, readings: Readings) -> None:
        self.r = readings

    def collect(self) -> Iterable[Any]:
        r, node = self.r, [self.r.node]
        yield _gauge("soaf_services_running", "Services running on this core.", r.running())
        usage = r.capacity()
        for name, text in (("max_services", "Services this core runs at once at most."),
                           ("cpus", "CPUs shared by services that declare cpus."),
                           ("cpus_used", "CPUs held by running services."),
                           ("memory_mb", "Memory (MiB) shared by services that declare it."),
                           ("memory_mb_used", "Memory (MiB) held by running services."),
                           ("waiting", "Services read by this core that wait for CPUs, "
                                       "memory or a fleet slot.")):
            if usage.get(name) is not None:
                yield _gauge(f"soaf_capacity_{name}", text, usage[name])
        yield _gauge("soaf_writer_backlog", "State changes queued for Redis, not yet written.",
                     r.backlog())
        reconnects = CounterMetricFamily("soaf_redis_reconnects", "Times the connection to "
                                         "Redis came back after it was lost.")
        reconnects.add_metric([], r.reconnects())
        yield reconnects
        failures = CounterMetricFamily("soaf_plugin_reload_failures", "Plugin loads that "
                                       "failed since the core started.")
        failures.add_metric([], r.reload_failures())
        yield failures
        version = InfoMetricFamily("soaf_plugin", "The plugin version serving on this core.",
                                   labels=["node"])
        version.add_metric(node, {"version": r.plugin_version() or "none"})
        yield version
        try:
            queues = r.queues()
        except Exception as e:  # Redis away: the rest of the scrape still answers
            log.debug("metrics: cannot read the queues: %s", e)
            return
        entries = GaugeMetricFamily("soaf_queue_entries", "Submissions in a queue not yet "
                                    "finished (waiting or running).", labels=["queue"])
        pending = GaugeMetricFamily("soaf_queue_pending", "Submissions in a queue read by a "
                                    "core and not yet finished.", labels=["queue"])
        for queue, (total, read) in sorted(queues.items()):
            entries.add_metric([queue], total)
            pending.add_metric([queue], read)
        yield entries
        yield pending


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)
