"""Routing across a fleet: cores with different plugins and labels share one Redis, each
takes only what it offers, best priority first, and nothing is refused for lack of a
plugin. Also the fleet view (``soaf nodes``, ``soaf services``, ``soaf ls``)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

from soaf import AsyncClient, ServiceParamTemplate
from soaf.protocol.keys import Keys
from tests.conftest import SECRET, wait_until
from tests.e2e.test_cli import soaf

KINDS = ("alpha", "beta", "gamma", "delta", "eps")
#: Each core's plugins and labels; delta requires the label "gpu", which only core-b has
#: (core-c has delta's plugin but not the label, so it must never take delta).
FLEET = {
    "core-a": ({"alpha", "beta", "gamma"}, ""),
    "core-b": ({"gamma", "delta", "eps"}, "gpu"),
    "core-c": ({"alpha", "delta", "eps"}, "bigmem"),
}
OFFERS = {"core-a": {"alpha", "beta", "gamma"}, "core-b": {"gamma", "delta", "eps"},
          "core-c": {"alpha", "eps"}}
PRIORITIES = (0, 5, 10)


def plugins(root: Path, kinds: set[str]) -> Path:
    """A plugin directory serving ``kinds``: each sleeps 0.1 s; delta requires a GPU."""
    for package in ("services", "handlers"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    for kind in kinds:
        requires = '{"gpu"}' if kind == "delta" else "frozenset()"
        (root / "services" / f"{kind}.py").write_text(textwrap.dedent(f"""\
            from soaf import ServiceProgramTemplate

            class Kind(ServiceProgramTemplate):
                name = "{kind}"
                requires = {requires}

                def command(self):
                    return ["sleep", "0.1"]
            """))
    return root


@pytest.fixture
def fleet(start_core, tmp_path, work_root):
    """Start the three cores (each with its own plugins, labels and work root)."""
    def start(max_services: int = 2) -> None:
        for node, (kinds, labels) in FLEET.items():
            start_core(SOAF_NODE=node, SOAF_PLUGINS=str(plugins(tmp_path / node, kinds)),
                       SOAF_LABELS=labels, SOAF_MAX_SERVICES=str(max_services),
                       SOAF_WORK_ROOT=str(work_root / node))
    return start


def test_three_cores_take_200_services_each_on_a_core_that_offers_it_best_first(
        fleet, client, redis_server, prefix):
    templates = [ServiceParamTemplate(KINDS[i % 5], priority=PRIORITIES[(i // 5) % 3],
                                      watch_interval=0.05) for i in range(200)]
    ids = [client.submit(t) for t in templates]  # all queued before any core is up
    assert client.status(ids[0]).get("waiting_for") == "no live core offers 'alpha'"
    fleet()
    records = {r.service_id: r for r in
               (client.wait(sid, timeout=240) for sid in ids)}
    by_core: dict[str, list] = defaultdict(list)
    for t in templates:
        r = records[t.service_id]
        assert r.state == "succeeded" and r.attempt == 1, r.to_dict()
        assert r.service in OFFERS[r.node], f"{r.service} ran on {r.node}"
        assert r.get("waiting_for") is None
        by_core[r.node].append((r.get("building_at"), t.priority, t.service_id))
    assert set(by_core) == set(FLEET)  # every core took work
    assert redis_server.client().xlen(Keys(prefix).deadletter) == 0
    for node, started in by_core.items():
        # Everything was queued when the core came up: it took its work in priority
        # order, so no service started before one of higher priority on the same core.
        for p in PRIORITIES:
            higher = [at for at, prio, _ in started if prio > p]
            this = [at for at, prio, _ in started if prio == p]
            if higher and this:
                assert max(higher) <= min(this), f"{node}: priority {p} started too early"


def test_fleet_view_and_waiting_work(fleet, client, core_env):
    nobody = client.submit(ServiceParamTemplate("nosuch"))
    fleet()
    nodes = json.loads(soaf(core_env, "nodes", "--json").stdout)
    seen = {n["node"]: n for n in nodes}
    for node, offers in OFFERS.items():
        assert set(seen[node]["services"]) == offers, node
        assert seen[node]["labels"] == sorted(filter(None, FLEET[node][1].split(",")))
        assert seen[node]["draining"] is False
    table = soaf(core_env, "nodes").stdout
    assert "LABELS" in table and "gpu" in table and "STATE" in table
    delta = client.submit(ServiceParamTemplate("delta", priority=7))
    assert client.wait(delta, timeout=60).node == "core-b"
    rows = {r["service"]: r for r in json.loads(soaf(core_env, "services", "--json").stdout)}
    assert rows["delta"]["cores"] == ["core-b"]
    assert sorted(rows["alpha"]["cores"]) == ["core-a", "core-c"]
    assert rows["nosuch"] == {"service": "nosuch", "cores": [], "queued": 1, "taken": 0,
                              "by_priority": {"0": 1}}
    assert "none alive" in soaf(core_env, "services").stdout
    listing = soaf(core_env, "ls", "--state", "queued").stdout
    assert nobody in listing and "waits: no live core offers 'nosuch'" in listing


def test_routing_fields_must_match_the_signed_payload(start_core, client, redis_server, prefix):
    """A signed payload pushed into another service's queue, or with clear fields that
    differ from it, is refused after the signature check; nothing runs."""
    import soaf as soaf_module
    from soaf.protocol.keys import GROUP

    start_core()
    r, keys = redis_server.client(), Keys(prefix)
    wrong_queue = ServiceParamTemplate("steps", args={"n": 1})
    wrong_clear = ServiceParamTemplate("steps", args={"n": 1})
    for queue in (keys.queue("true", 0), keys.queue("steps", 0)):
        if not r.exists(queue):
            r.xgroup_create(queue, GROUP, id="0", mkstream=True)
        r.sadd(keys.queues, queue.removeprefix(keys.queue_prefix))
    r.xadd(keys.queue("true", 0), {"payload": soaf_module.dumps(wrong_queue, SECRET),
                                   "id": wrong_queue.service_id})
    r.xadd(keys.queue("steps", 0), {"payload": soaf_module.dumps(wrong_clear, SECRET),
                                    "id": wrong_clear.service_id, "service": "steps",
                                    "priority": "9"})
    first = client.wait(wrong_queue.service_id, timeout=30)
    assert first.state == "rejected" and "but its signed payload belongs in" in first.error
    second = client.wait(wrong_clear.service_id, timeout=30)
    assert second.state == "rejected"
    assert "routing field 'priority' is '9' in clear but '0'" in second.error
    wait_until(lambda: r.xlen(keys.queue("steps", 0)) == r.xlen(keys.queue("true", 0)) == 0, 10,
               message="the refused entries to be gone")


def test_entries_of_the_old_submit_stream_are_forwarded_to_their_queues(
        start_core, client, redis_server, prefix):
    """Payloads pushed to the single stream of older versions (or by a plain XADD that
    names no queue) still run; one for a service no core offers waits in its queue."""
    import soaf as soaf_module

    r, keys = redis_server.client(), Keys(prefix)
    runs = ServiceParamTemplate("steps", args={"n": 1}, priority=3)
    waits = ServiceParamTemplate("nosuch")
    for t in (runs, waits):  # queued before any core: as at an upgrade
        r.xadd(keys.submit, {"payload": soaf_module.dumps(t, SECRET), "id": t.service_id})
    start_core()
    assert client.wait(runs.service_id, timeout=30).state == "succeeded"
    wait_until(lambda: r.xlen(keys.queue("nosuch", 0)) == 1 and r.xlen(keys.submit) == 0, 10,
               message="the entry for 'nosuch' to be forwarded to its queue")
    rows = {row["service"]: row for row in client.services()}
    assert rows["nosuch"]["queued"] == 1 and rows["nosuch"]["cores"] == []
    assert rows["steps"]["cores"] == ["core-a"]

    async def services_async():
        async with AsyncClient(redis_server.url, secret=SECRET, prefix=prefix) as aio:
            return await aio.services()

    assert {row["service"]: row for row in asyncio.run(services_async())} == rows


def test_work_of_a_service_removed_by_a_reload_waits_for_another_core(
        start_core, client, tmp_path, work_root):
    first = plugins(tmp_path / "first", {"alpha", "beta"})
    start_core(SOAF_NODE="first", SOAF_PLUGINS=str(first), SOAF_WORK_ROOT=str(work_root / "1"))
    assert client.wait(client.submit(ServiceParamTemplate("beta")), timeout=30).node == "first"
    (first / "services" / "beta.py").unlink()
    wait_until(lambda: [n["services"] for n in client.nodes()] == [["alpha"]], 30,
               message="the reload to drop beta from the offers")
    waiting = client.submit(ServiceParamTemplate("beta"))
    assert client.wait(client.submit(ServiceParamTemplate("alpha")), timeout=30).ok
    assert client.status(waiting).state == "queued"  # left alone, not refused
    start_core(SOAF_NODE="second", SOAF_PLUGINS=str(plugins(tmp_path / "second", {"beta"})),
               SOAF_WORK_ROOT=str(work_root / "2"))
    record = client.wait(waiting, timeout=30)
    assert (record.state, record.node) == ("succeeded", "second")


def test_a_core_restarted_without_a_plugin_hands_its_running_service_on(
        start_core, client, tmp_path, work_root):
    """Killed while running 'beta', restarted without beta's plugin: the attempt is
    stopped and its entry goes back to beta's queue; a core that offers beta runs it."""
    from tests.conftest import crash

    first = plugins(tmp_path / "first", {"alpha", "beta"})
    (first / "services" / "beta.py").write_text((first / "services" / "beta.py").read_text()
                                                 .replace('["sleep", "0.1"]', '["sleep", "60"]'))
    env = {"SOAF_NODE": "first", "SOAF_PLUGINS": str(first), "SOAF_WORK_ROOT": str(work_root / "1")}
    core = start_core(**env)
    sid = client.submit(ServiceParamTemplate("beta"))
    wait_until(lambda: client.status(sid).state == "running", 30, message="beta running")
    crash(core, client, [sid])
    (first / "services" / "beta.py").unlink()
    start_core(**env)
    wait_until(lambda: client.services() and {r["service"]: r for r in client.services()}
               .get("beta", {}).get("queued") == 1, 30, message="beta's entry back in its queue")
    start_core(SOAF_NODE="second", SOAF_PLUGINS=str(plugins(tmp_path / "second", {"beta"})),
               SOAF_WORK_ROOT=str(work_root / "2"))
    record = client.wait(sid, timeout=60)
    assert (record.state, record.node, record.attempt) == ("succeeded", "second", 2)


def test_plain_redis_py_submission_as_protocol_md_shows(start_core, client, redis_server, prefix):
    import soaf as soaf_module

    start_core()
    t = ServiceParamTemplate("steps", args={"n": 1}, priority=2)
    r = redis_server.client()
    r.sadd(f"{prefix}:queues", "steps:2")
    r.xadd(f"{prefix}:q:steps:2", {"payload": soaf_module.dumps(t, SECRET), "id": t.service_id,
                                   "service": "steps", "priority": "2"})
    r.sadd(f"{prefix}:ready", "steps:2")
    assert client.wait(t.service_id, timeout=30).state == "succeeded"


def test_a_draining_core_says_so_and_offers_nothing(start_core, client, core_env):
    import signal

    core = start_core()
    sid = client.submit(ServiceParamTemplate("sleep", args={"seconds": 60}))
    wait_until(lambda: client.status(sid).state == "running", 30, message="running")
    assert "steps" in client.nodes()[0]["services"]
    core.signal(signal.SIGTERM)  # drain: the running service may finish, nothing new starts
    node = wait_until(lambda: (n := client.nodes()) and n[0]["draining"] and n[0], 30,
                      message="the heartbeat to say the core drains")
    assert node["services"] == [] and node["running"] == 1
    assert "yes" in soaf(core_env, "nodes").stdout
    client.cancel(sid)
    assert client.wait(sid, timeout=30).state == "cancelled"
