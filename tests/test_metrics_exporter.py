"""CoreMetrics fed state changes by hand: what each change counts."""

from __future__ import annotations

from soaf.metrics.exporter import CoreMetrics, Readings, RunInfo
from soaf.protocol.state import Change


def readings(queues=lambda: {"soaf:submit": (3, 1)}) -> Readings:
    return Readings(node="n1", running=lambda: 2, capacity=lambda: {"max_services": 8,
                                                                     "cpus": None},
                    backlog=lambda: 5, reconnects=lambda: 1, plugin_version=lambda: "4-abc",
                    reload_failures=lambda: 2, queues=queues)


def metrics(**kw) -> CoreMetrics:
    infos = {"a": RunInfo("wc", 100.0), "b": RunInfo("wc", None)}
    return CoreMetrics(readings(**kw), run_info=infos.get)


def get(m: CoreMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels or None)


def test_start_end_wait_and_run_time_of_a_service():
    m = metrics()
    m.observe(Change("a", 1, 2, {"state": "building"}, ts=100.5))
    m.observe(Change("a", 1, 5, {"state": "running"}, ts=102.0))
    m.observe(Change("a", 1, 6, {"progress": 0.5}, ts=103.0))
    m.observe(Change("a", 1, 7, {"state": "succeeded"}, ts=112.0))
    assert get(m, "soaf_services_started_total", service="wc") == 1
    assert get(m, "soaf_services_finished_total", service="wc", state="succeeded") == 1
    assert get(m, "soaf_queue_wait_seconds_sum", service="wc") == 2.0
    assert get(m, "soaf_run_seconds_sum", service="wc") == 10.0
    assert m._running_since == {}


def test_retries_count_each_start_and_a_put_back_service_leaves_nothing_behind():
    m = metrics()
    m.observe(Change("b", 1, 5, {"state": "running"}, ts=1.0))
    m.observe(Change("b", 1, 6, {"state": "retrying"}, ts=2.0))
    m.observe(Change("b", 2, 7, {"state": "running"}, ts=3.0))
    m.observe(Change("b", 2, 8, {"state": "queued"}, ts=4.0))  # the core stopped it
    assert get(m, "soaf_services_started_total", service="wc") == 2
    assert get(m, "soaf_queue_wait_seconds_count", service="wc") is None  # no submit time
    assert get(m, "soaf_services_finished_total", service="wc", state="failed") is None
    assert m._running_since == {}


def test_refusals_callback_errors_and_the_levels_read_at_scrape():
    m = metrics()
    m.observe(Change("zz", 0, 2, {"state": "rejected", "service": "ghost"}))
    m.observe(Change("nameless", 0, 2, {"state": "rejected"}))
    m.observe(Change("a", 1, 9, {"callback_error": "boom", "callback_errors": 1}))
    m.observe(Change("a", 1, 10, {"callback_error": "boom", "callback_errors": 2}))
    assert get(m, "soaf_services_finished_total", service="ghost", state="rejected") == 1
    assert get(m, "soaf_services_finished_total", service="unknown", state="rejected") == 1
    assert get(m, "soaf_callback_errors_total", service="wc") == 2
    assert get(m, "soaf_services_running") == 2
    assert get(m, "soaf_capacity_max_services") == 8
    assert get(m, "soaf_capacity_cpus") is None  # None values are left out
    assert get(m, "soaf_writer_backlog") == 5
    assert get(m, "soaf_redis_reconnects_total") == 1
    assert get(m, "soaf_plugin_reload_failures_total") == 2
    assert get(m, "soaf_plugin_info", node="n1", version="4-abc") == 1
    assert get(m, "soaf_queue_entries", queue="soaf:submit") == 3
    assert get(m, "soaf_queue_pending", queue="soaf:submit") == 1


def test_a_failing_reading_or_lookup_costs_neither_the_scrape_nor_the_change():
    def down():
        raise ConnectionError("Redis away")

    m = metrics(queues=down)
    assert get(m, "soaf_services_running") == 2 and get(m, "soaf_queue_entries") is None
    broken = CoreMetrics(readings(), run_info=lambda sid: 1 / 0)
    broken.observe(Change("a", 1, 5, {"state": "running"}))  # logged, not raised
