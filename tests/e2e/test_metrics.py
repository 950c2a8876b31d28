"""A real core serves Prometheus metrics over HTTP, and the values move as services run."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from soaf import ServiceParamTemplate
from tests.conftest import wait_until


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metrics_core(start_core):
    core = start_core(args=["--metrics-port", "0"])
    found = re.search(r"metrics on (http://[\d.]+:\d+/metrics)", core.log())
    assert found, core.log()
    return core, found.group(1)


def test_the_values_move_as_services_run(metrics_core, client):
    _core, url = metrics_core
    before = scrape(url)
    assert value(before, "soaf_services_running") == 0
    assert value(before, "soaf_capacity_max_services") == 64
    assert value(before, "soaf_plugin_info", node="core-a", version="none") == 0  # one loaded
    assert any(name == "soaf_plugin_info" and dict(labels)["version"] != "none"
               for name, labels in before)
    assert value(before, "soaf_writer_backlog") >= 0

    slow = client.submit(ServiceParamTemplate("sleep", args={"seconds": 30}))
    wait_until(lambda: client.status(slow).state == "running", 20)
    during = scrape(url)
    assert value(during, "soaf_services_running") == 1
    assert value(during, "soaf_services_started_total", service="sleep") == 1
    queue = client.keys.queue("sleep", 0)
    assert value(during, "soaf_queue_entries", queue=queue) == 1
    assert value(during, "soaf_queue_pending", queue=queue) == 1

    done = [client.submit(ServiceParamTemplate("steps", args={"n": 1, "delay": 0.01},
                                               watch_interval=0.05)) for _ in range(3)]
    failed = client.submit(ServiceParamTemplate("steps", args={"n": 1, "delay": 0.01, "code": 3}))
    raising = client.submit(ServiceParamTemplate("cb-raise", args={"seconds": 0.5},
                                                 watch_interval=0.05))
    client.wait_all([*done, failed, raising], timeout=60)
    client.cancel(slow)
    client.wait(slow, timeout=30)

    def after():
        return scrape(url)

    wait_until(lambda: value(after(), "soaf_services_running") == 0, 10)
    now = after()
    assert value(now, "soaf_services_started_total", service="steps") == 4
    assert value(now, "soaf_services_finished_total", service="steps", state="succeeded") == 3
    assert value(now, "soaf_services_finished_total", service="steps", state="failed") == 1
    assert value(now, "soaf_services_finished_total", service="sleep", state="cancelled") == 1
    assert value(now, "soaf_queue_wait_seconds_count", service="steps") == 4
    assert value(now, "soaf_run_seconds_count", service="steps") == 4
    assert value(now, "soaf_run_seconds_sum", service="sleep") > 0
    assert value(now, "soaf_callback_errors_total", service="cb-raise") >= 1
    assert value(now, "soaf_queue_entries", queue=queue) == 0
    assert value(now, "soaf_redis_reconnects_total") == 0
    assert value(now, "soaf_plugin_reload_failures_total") == 0


def test_a_broken_plugin_edit_counts_as_a_reload_failure(metrics_core, client, plugin_dir):
    _core, url = metrics_core
    (plugin_dir / "handlers" / "broken_now.py").write_text("class Broken(:\n    pass\n")
    client.reload()
    wait_until(lambda: value(scrape(url), "soaf_plugin_reload_failures_total") >= 1, 20)


def test_a_taken_port_stops_the_core_with_a_clear_error(start_core, metrics_core):
    _core, url = metrics_core
    port = url.rsplit(":", 1)[1].split("/")[0]
    other = start_core(args=["--metrics-port", port], wait_ready=False, SOAF_NODE="core-b")
    wait_until(lambda: other.proc.poll() is not None, 20)
    assert other.proc.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{port}" in other.log()


def test_a_redis_outage_shows_as_backlog_then_a_reconnect(start_core, own_redis, prefix):
    from soaf import Client
    from tests.conftest import SECRET

    core = start_core(args=["--metrics-port", "0"], SOAF_REDIS_URL=own_redis.url)
    url = re.search(r"metrics on (http://[\d.]+:\d+/metrics)", core.log()).group(1)
    with Client(own_redis.url, secret=SECRET, prefix=prefix) as client:
        sid = client.submit(ServiceParamTemplate("sleep", args={"seconds": 2}))
        wait_until(lambda: client.status(sid).state == "running", 20)
    own_redis.kill()  # the service ends while Redis is away: its changes wait in the writer
    wait_until(lambda: value(scrape(url), "soaf_writer_backlog") > 0, 20)
    assert not any(name == "soaf_queue_entries" for name, _ in scrape(url))  # Redis unread
    own_redis.start()
    wait_until(lambda: value(scrape(url), "soaf_redis_reconnects_total") == 1, 30)
    wait_until(lambda: value(scrape(url), "soaf_writer_backlog") == 0, 30)
