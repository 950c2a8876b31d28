"""Client calls against a real core: waiting, following, listing, cancelling, errors."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import redis

import soaf
import soaf.client.follow
from soaf import Client, ServiceParamTemplate
from soaf.errors import (
    ConfigError,
    DuplicateService,
    LogsUnavailable,
    RedisUnavailable,
    UnknownService,
    ValidationError,
    WaitTimeout,
)
from soaf.protocol.keys import Keys
from tests.conftest import SECRET, wait_until


def steps(n: int = 2, delay: float = 0.05, code: int = 0, **kw) -> ServiceParamTemplate:
    return ServiceParamTemplate("steps", args={"n": n, "delay": delay, "code": code},
                                watch_interval=0.05, **kw)


def test_submit_status_wait(start_core, client):
    start_core()
    t = steps()
    sid = client.submit(t)
    assert sid == t.service_id
    assert client.status(sid).state in ("queued", "building", "preparing", "running", "succeeded")
    record = client.wait(sid, timeout=30)
    assert record.ok and record.final and record.state == "succeeded"
    assert record.service == "steps" and record.node == "core-a"
    with pytest.raises(DuplicateService, match="already submitted"):
        client.submit(t)
    with pytest.raises(ValidationError, match="service"):
        client.submit(ServiceParamTemplate("no spaces allowed"))


def test_wait_returns_the_record_of_a_failed_or_rejected_service(start_core, client):
    start_core()
    failed = client.submit(steps(n=1, code=3))
    rejected = client.submit(ServiceParamTemplate("nosuch"))
    by_id = {r.service_id: r for r in client.wait_all([failed, rejected], timeout=30)}
    assert by_id[failed].state == "failed" and not by_id[failed].ok
    assert "exited with code 3" in by_id[failed].error
    assert by_id[rejected].state == "rejected" and "unknown service 'nosuch'" in by_id[rejected].error


def test_wait_timeout_then_cancel(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("sleep", args={"seconds": 30}))
    with pytest.raises(WaitTimeout, match=sid):
        client.wait(sid, timeout=0.5)
    wait_until(lambda: client.status(sid).state == "running", 20, message="running")
    assert client.cancel(sid) == "cancel requested; it was running and will end cancelled"
    record = client.wait(sid, timeout=30)
    assert record.state == "cancelled"
    assert client.cancel(sid) == "already cancelled; nothing to cancel"


def test_as_completed_yields_in_finishing_order_and_wait_all_in_given_order(start_core, client):
    start_core()
    slow = client.submit(ServiceParamTemplate("sleep", args={"seconds": 30}))
    fast = client.submit(ServiceParamTemplate("true"))
    seen = []
    for record in client.as_completed([slow, fast, fast], timeout=60):
        seen.append((record.service_id, record.state))
        if record.service_id == fast:
            client.cancel(slow)  # the slow one can only end after this
    assert seen == [(fast, "succeeded"), (slow, "cancelled")]
    assert [r.service_id for r in client.wait_all([slow, fast])] == [slow, fast]


def test_unknown_ids(start_core, client, monkeypatch):
    monkeypatch.setattr(soaf.client.follow, "UNKNOWN_GRACE", 0.3)
    for call in (client.status, client.wait, client.cancel, lambda i: list(client.events(i)),
                 lambda i: list(client.events(i, follow=False)), lambda i: list(client.logs(i))):
        with pytest.raises(UnknownService, match="no service with id 'nope'"):
            call("nope")
    start_core()
    good = client.submit(ServiceParamTemplate("true"))
    with pytest.raises(UnknownService, match="'nope'"):
        client.wait_all([good, "nope"], timeout=30)


def test_wait_for_an_id_whose_record_appears_only_when_a_core_takes_it(
        start_core, client, redis_server, prefix, monkeypatch):
    """A plain redis-py submission has no record until a core claims it: wait gives it time."""
    monkeypatch.setattr(soaf.client.follow, "UNKNOWN_GRACE", 60)
    t = ServiceParamTemplate("true")
    redis_server.client().xadd(f"{prefix}:submit", {"payload": soaf.dumps(t, SECRET)})
    result = {}
    waiter = threading.Thread(target=lambda: result.update(r=client.wait(t.service_id, 60)))
    waiter.start()
    start_core()
    waiter.join(60)
    assert result["r"].state == "succeeded"


def test_events_have_no_gap_or_duplicate_across_the_replay_live_edge(start_core, client,
                                                                     redis_server, prefix):
    start_core()
    sid = client.submit(steps(n=8, delay=0.15))
    stream = Keys(prefix).events(sid)
    r = redis_server.client()
    collected: dict[int, list[str]] = {}
    joiners = []

    def subscribe(k: int) -> None:
        collected[k] = [e["event_id"] for e in client.events(sid, timeout=60)]

    # Subscribers join late, at different points of the run, while events keep coming.
    for k, after in enumerate((2, 4, 6, 9, 12)):
        wait_until(lambda a=after: r.xlen(stream) >= a or client.status(sid).final, 30,
                   message=f"{after} events")
        joiners.append(threading.Thread(target=subscribe, args=(k,)))
        joiners[-1].start()
    for thread in joiners:
        thread.join(60)
    full = [raw.decode() for raw, _ in r.xrange(stream)]
    assert len(full) > 12
    for k, ids in collected.items():
        assert ids == full, f"subscriber {k} saw a different stream"
    events = list(client.events(sid, follow=False))
    assert [e["event_id"] for e in events] == full
    assert events[0]["state"] == "queued" and events[-1]["state"] == "succeeded"


def test_follow_several_services(start_core, client):
    start_core()
    a, b = client.submit(steps(n=2)), client.submit(steps(n=3))
    seen: dict[str, list[str]] = {a: [], b: []}
    for sid, event in client.follow([a, client.status(b)], timeout=60, replay=True):
        if "state" in event:
            seen[sid].append(event["state"])
    for states in seen.values():
        assert states[0] == "queued" and states[-1] == "succeeded"
        assert "running" in states
    assert list(client.follow([a, b], timeout=5)) == []  # both final: nothing to follow


def test_list_filters(start_core, client):
    start_core()
    before = __import__("time").time()
    ok = client.submit(ServiceParamTemplate("true"))
    bad = client.submit(steps(n=1, code=2))
    client.wait_all([ok, bad], timeout=30)
    assert [r.service_id for r in client.list()][:2] == [bad, ok]  # newest first
    assert [r.service_id for r in client.list(service="true")] == [ok]
    assert [r.service_id for r in client.list(state="failed")] == [bad]
    assert {r.service_id for r in client.list(node="core-a")} == {ok, bad}
    assert client.list(node="elsewhere") == []
    assert len(client.list(limit=1)) == 1
    assert {r.service_id for r in client.list(since=before)} == {ok, bad}
    assert client.list(since=before + 3600) == []


def test_logs(start_core, client, work_root):
    start_core()
    sid = client.submit(steps(n=3, delay=0.4))
    wait_until(lambda: client.status(sid).state == "running", 20, message="running")
    followed = list(client.logs(sid, follow=True))  # from a running service to its end
    assert followed == ["step 1", "step 2", "step 3"]
    assert list(client.logs(sid)) == ["step 1", "step 2", "step 3"]
    assert list(client.logs(sid, tail=1)) == ["step 3"]
    assert list(client.logs(sid, tail=0)) == []
    assert list(client.logs(sid, stream="stderr")) == ["done with 3 steps"]
    shutil.rmtree(Path(client.status(sid).get("work_dir")))  # as if it were on another host
    with pytest.raises(LogsUnavailable, match="node core-a"):
        list(client.logs(sid))


def test_plugins_nodes_reload(start_core, client):
    start_core()
    wait_until(lambda: client.nodes() and client.plugins(), 20, message="heartbeat")
    (node,) = client.nodes()
    assert node["node"] == "core-a" and node["running"] == 0 and node["max_services"] >= 1
    info = client.plugins()["core-a"]
    assert info["version"].startswith("1-") and "steps" in info["services"]
    client.reload()
    wait_until(lambda: client.plugins()["core-a"]["version"].startswith("2-"), 20,
               message="the reload")


def test_redis_unreachable(tmp_path, own_redis, start_core, prefix):
    missing = Client(f"unix://{tmp_path}/no.sock", secret=SECRET)
    with pytest.raises(RedisUnavailable, match="cannot reach Redis at unix://"):
        missing.status("x")
    with pytest.raises(RedisUnavailable):
        missing.submit(ServiceParamTemplate("true"))
    with pytest.raises(RedisUnavailable):
        list(missing.events("x"))
    start_core(SOAF_REDIS_URL=own_redis.url)
    client = Client(own_redis.url, secret=SECRET, prefix=prefix, reconnect_for=1)
    sid = client.submit(ServiceParamTemplate("sleep", args={"seconds": 30}))
    failure: list[BaseException] = []

    def waiting() -> None:
        try:
            client.wait(sid, timeout=60)
        except BaseException as e:  # the test looks at it
            failure.append(e)

    waiter = threading.Thread(target=waiting)
    waiter.start()
    wait_until(lambda: client.status(sid).state == "running", 20, message="running")
    own_redis.kill()
    waiter.join(30)
    assert failure and isinstance(failure[0], RedisUnavailable), failure
    assert not isinstance(failure[0], redis.RedisError)


def test_client_finds_redis_and_secret_in_the_state_dir(start_core, redis_server, prefix,
                                                        tmp_path, monkeypatch):
    start_core()
    for name in ("SOAF_REDIS_URL", "SOAF_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SOAF_PREFIX", prefix)
    state = tmp_path / "found"
    with pytest.raises(ConfigError, match="no Redis to talk to"):
        Client(state_dir=state)
    state.mkdir()
    (state / "redis.url").write_text(redis_server.url + "\n")
    (state / "secret").write_text(SECRET + "\n")
    with Client(state_dir=state) as found:
        assert found.wait(found.submit(ServiceParamTemplate("true")), 30).ok


def test_events_of_a_final_service_never_block(start_core, client, redis_server, prefix):
    """A finished service's events are all there is: even with its stream gone, no wait."""
    start_core()
    sid = client.submit(ServiceParamTemplate("true"))
    client.wait(sid, timeout=30)
    assert [e["state"] for e in client.events(sid, timeout=5) if "state" in e][-1] == "succeeded"
    redis_server.client().delete(Keys(prefix).events(sid))
    assert list(client.events(sid, timeout=5)) == []


def test_waiting_for_many_services_goes_through_the_notify_channel(start_core, client,
                                                                   monkeypatch):
    monkeypatch.setattr(soaf.client.follow, "UNKNOWN_GRACE", 0.5)
    start_core()
    ids = [client.submit(ServiceParamTemplate("true")) for _ in range(soaf.client.follow.STREAM_WAIT_MAX)]
    slow = client.submit(ServiceParamTemplate("sleep", args={"seconds": 30}))
    finished = []
    for record in client.as_completed([slow, *ids], timeout=60):
        finished.append(record.service_id)
        if len(finished) == len(ids):
            client.cancel(slow)  # the slow one can only end after this
    assert sorted(finished[:-1]) == sorted(ids) and finished[-1] == slow
    assert client.status(slow).state == "cancelled"
    with pytest.raises(UnknownService, match="'nope'"):
        client.wait_all([*ids, "nope"], timeout=30)
    busy = [client.submit(ServiceParamTemplate("sleep", args={"seconds": 30})) for _ in range(17)]
    with pytest.raises(WaitTimeout, match=r"17 service\(s\) not final"):
        client.wait_all(busy, timeout=1)
    for sid in busy:
        client.cancel(sid)
