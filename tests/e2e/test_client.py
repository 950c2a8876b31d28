"""Client and AsyncClient against a real core: waiting, following, listing, cancelling, logs, errors.

Every test runs twice, once with ``Client`` and once with ``AsyncClient`` (driven
through tests/blocking.py), so the two cannot behave differently.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import redis

import soaf
import soaf.client.follow
from soaf import ServiceParamTemplate
from soaf.errors import (
    ConfigError,
    DuplicateService,
    RedisUnavailable,
    UnknownService,
    ValidationError,
    WaitTimeout,
)
from soaf.protocol.keys import Keys
from soaf.protocol.state import decode_events
from tests.blocking import flavours
from tests.conftest import SECRET, until_waiting, wait_until
from tests.test_tail import punch_head


@pytest.fixture(params=["sync", "async"])
def make_client(request):
    """The client class under test; every client made with it is closed afterwards."""
    cls = flavours()[request.param]
    made = []

    def make(*args, **kwargs):
        made.append(cls(*args, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture
def client(make_client, redis_server, prefix):
    return make_client(redis_server.url, secret=SECRET, prefix=prefix)


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


def test_a_payload_over_the_limit_is_refused_before_it_is_sent(make_client, redis_server,
                                                               prefix, monkeypatch):
    small = make_client(redis_server.url, secret=SECRET, prefix=prefix, max_payload=2000)
    big = ServiceParamTemplate("true", args={"blob": "x" * 5000})
    with pytest.raises(ValidationError, match=r"payload.*over the limit of 2000"):
        small.submit(big)
    monkeypatch.setenv("SOAF_MAX_PAYLOAD", "3000")
    from_env = make_client(redis_server.url, secret=SECRET, prefix=prefix)
    assert from_env.max_payload == 3000
    with pytest.raises(ValidationError, match="over the limit of 3000"):
        from_env.submit(big)
    with pytest.raises(UnknownService):
        from_env.status(big.service_id)  # nothing was queued
    assert from_env.submit(ServiceParamTemplate("true"))


def test_cancel_of_a_queued_service_is_final_at_once(start_core, client):
    queued = client.submit(ServiceParamTemplate("steps", args={"n": 1}))  # no core yet
    assert client.cancel(queued) == "cancelled (it was queued and never started)"
    record = client.status(queued)
    assert record.state == "cancelled" and record.error == "cancelled before it started"
    assert client.wait(queued, timeout=1).state == "cancelled"
    assert client.cancel(queued) == "already cancelled; nothing to cancel"
    start_core()
    after = client.wait(client.submit(ServiceParamTemplate("true")), timeout=30)
    assert after.ok  # the core is at work, and the cancelled one never ran
    assert client.status(queued).state == "cancelled" and not client.status(queued).node


def test_wait_returns_the_record_of_a_failed_or_rejected_service(start_core, client, work_root,
                                                                  tmp_path):
    start_core()
    (work_root / "escape").symlink_to(tmp_path)  # only the core can tell it leads out
    failed = client.submit(steps(n=1, code=3))
    rejected = client.submit(ServiceParamTemplate("steps", work_path="escape/x"))
    by_id = {r.service_id: r for r in client.wait_all([failed, rejected], timeout=30)}
    assert by_id[failed].state == "failed" and not by_id[failed].ok
    assert "exited with code 3" in by_id[failed].error
    assert by_id[rejected].state == "rejected" and "outside" in by_id[rejected].error


def test_wait_timeout_then_cancel(start_core, client, redis_server):
    start_core()
    sid = client.submit(ServiceParamTemplate("sleep", args={"seconds": 30}))
    with pytest.raises(WaitTimeout, match=sid):
        client.wait(sid, timeout=0.5)
    wait_until(lambda: client.status(sid).state == "running", 20, message="running")
    assert client.cancel(sid) == "cancel requested; it was running and will end cancelled"
    record = client.wait(sid, timeout=30)
    assert record.state == "cancelled"
    assert record.get("cancel_requested_at") is not None
    assert not redis_server.client().hexists(client.keys.cancels, sid)  # the request is spent
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
                 lambda i: list(client.events(i, follow=False)), lambda i: list(client.logs(i)),
                 client.log_lines, lambda i: list(client.follow_logs(i, timeout=5))):
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
        collected[k] = [(e["event_id"], e["seq"]) for e in client.events(sid, timeout=60)]

    # Subscribers join late, at different points of the run, while events keep coming.
    for k, after in enumerate((2, 4, 6, 9, 12)):
        wait_until(lambda a=after: r.xlen(stream) >= a or client.status(sid).final, 30,
                   message=f"{after} events")
        joiners.append(threading.Thread(target=subscribe, args=(k,)))
        joiners[-1].start()
    for thread in joiners:
        thread.join(60)
    full = [(raw.decode(), e["seq"]) for raw, data in r.xrange(stream)
            for e in decode_events(data)]
    assert len(full) > 12 and len({entry for entry, _ in full}) > 6
    assert [seq for _, seq in full] == list(range(1, len(full) + 1))
    for k, ids in collected.items():
        assert ids == full, f"subscriber {k} saw a different stream"
    events = list(client.events(sid, follow=False))
    assert [(e["event_id"], e["seq"]) for e in events] == full
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


def test_logs_come_from_redis_and_from_the_work_dir_only_without_a_copy(
        start_core, client, redis_server, prefix):
    start_core(SOAF_LOG_INTERVAL="0.05")
    sid = client.submit(steps(n=3, delay=0.4))
    wait_until(lambda: client.status(sid).state == "running", 20, message="running")
    followed = list(client.logs(sid, follow=True))  # from a running service to its end
    assert followed == ["step 1", "step 2", "step 3"]
    assert list(client.logs(sid)) == ["step 1", "step 2", "step 3"]
    assert list(client.logs(sid, tail=1)) == ["step 3"]
    assert list(client.logs(sid, tail=0)) == []
    assert list(client.logs(sid, stream="stderr")) == ["done with 3 steps"]
    assert list(client.logs(sid, follow=True, tail=2)) == ["step 2", "step 3"]  # final: at once
    with pytest.raises(ValueError, match="stream"):
        list(client.logs(sid, stream="stdin"))
    lines = client.log_lines(sid, tail=2, streams=["stdout"])
    assert [(line.stream, line.text) for line in lines] == [("stdout", "step 2"), ("stdout", "step 3")]
    assert {line.text for line in client.log_lines(sid)} == {"step 1", "step 2", "step 3",
                                                            "done with 3 steps"}
    assert [line.text for line in client.follow_logs(sid, tail=5, streams=["stdout"],
                                                     timeout=5)] == ["step 1", "step 2", "step 3"]

    # Redis has no copy (the log stream is gone): the work dir on this host is read, and
    # a capped file's punched head is skipped rather than read as NUL bytes.
    redis_server.client().delete(Keys(prefix).log(sid))
    work_dir = Path(client.status(sid).get("work_dir"))
    assert list(client.logs(sid)) == ["step 1", "step 2", "step 3"]
    stdout = work_dir / "stdout.log"
    stdout.write_bytes(b"x" * 8192 + b"...ragged\nstep 1\nstep 2\nstep 3\n")
    punch_head(stdout, 8192)
    assert list(client.logs(sid)) == ["...ragged", "step 1", "step 2", "step 3"]
    assert list(client.logs(sid, tail=10)) == ["...ragged", "step 1", "step 2", "step 3"]
    assert client.log_lines(sid) == []  # log_lines reads Redis only
    shutil.rmtree(work_dir)  # as if on another host: neither copy is reachable
    assert list(client.logs(sid)) == []


def test_the_output_of_a_program_that_ends_at_once_reaches_redis(start_core, client,
                                                                  redis_server, prefix):
    # Such a program may write everything (and end) before its start has returned.
    start_core()
    ids = [client.submit(ServiceParamTemplate("shell", args={"script": f"echo out {i}; echo err >&2"}))
           for i in range(20)]
    quiet = client.submit(ServiceParamTemplate("shell", args={"script": "true"}))
    client.wait_all([*ids, quiet], timeout=120)
    for i, sid in enumerate(ids):
        assert sorted(line.text for line in client.log_lines(sid)) == ["err", f"out {i}"], sid
    # Their log streams age with their records; one that printed nothing has none to age.
    r, keys = redis_server.client(), Keys(prefix)
    assert all(r.ttl(keys.log(sid)) > 0 for sid in ids)
    assert not r.exists(keys.log(quiet)) and r.ttl(keys.service(quiet)) > 0


def test_follow_logs_from_a_service_that_has_not_started(start_core, client):
    sid = client.submit(steps(n=3, delay=0.2))
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(
        line.text for line in client.follow_logs(sid, tail=10, streams=["stdout"], timeout=60)))
    reader.start()
    start_core(SOAF_LOG_INTERVAL="0.05")
    reader.join(60)
    assert got == ["step 1", "step 2", "step 3"]
    sleeper = client.submit(ServiceParamTemplate("sleep", args={"seconds": 30}))
    with pytest.raises(WaitTimeout):
        list(client.follow_logs(sleeper, timeout=0.5))
    client.cancel(sleeper)


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


def test_redis_unreachable(tmp_path, own_redis, start_core, prefix, make_client):
    missing = make_client(f"unix://{tmp_path}/no.sock", secret=SECRET)
    with pytest.raises(RedisUnavailable, match="cannot reach Redis at unix://"):
        missing.status("x")
    with pytest.raises(RedisUnavailable):
        missing.submit(ServiceParamTemplate("true"))
    with pytest.raises(RedisUnavailable):
        list(missing.events("x"))
    start_core(SOAF_REDIS_URL=own_redis.url)
    client = make_client(own_redis.url, secret=SECRET, prefix=prefix, reconnect_for=1)
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


def test_waiting_and_following_logs_ride_out_a_redis_restart(own_redis, start_core, prefix,
                                                             make_client):
    start_core(SOAF_REDIS_URL=own_redis.url, SOAF_LOG_INTERVAL="0.05")
    client = make_client(own_redis.url, secret=SECRET, prefix=prefix, reconnect_for=30)
    sid = client.submit(steps(n=6, delay=0.5))
    results: dict[str, object] = {}

    def waiting() -> None:
        try:
            results["record"] = client.wait(sid, timeout=90)
        except BaseException as e:  # the test looks at it
            results["record"] = e

    def following() -> None:
        try:
            results["lines"] = [line.text for line in client.follow_logs(
                sid, tail=10, streams=["stdout"], timeout=90)]
        except BaseException as e:
            results["lines"] = e

    threads = [threading.Thread(target=waiting), threading.Thread(target=following)]
    wait_until(lambda: client.status(sid).state == "running", 20, message="running")
    for thread in threads:
        thread.start()
    wait_until(lambda: client.log_lines(sid), 20, message="a first line")
    until_waiting(client)  # (the outage begins once the wait can ride it out)
    own_redis.stop()  # a clean restart: the append-only file keeps everything
    own_redis.start()
    for thread in threads:
        thread.join(90)
    record = results["record"]
    assert getattr(record, "state", record) == "succeeded"
    assert results["lines"] == [f"step {i}" for i in range(1, 7)]


def test_client_finds_redis_and_secret_in_the_state_dir(start_core, redis_server, prefix,
                                                        tmp_path, monkeypatch, make_client):
    start_core()
    for name in ("SOAF_REDIS_URL", "SOAF_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SOAF_PREFIX", prefix)
    state = tmp_path / "found"
    with pytest.raises(ConfigError, match="no Redis to talk to"):
        make_client(state_dir=state)
    state.mkdir()
    (state / "redis.url").write_text(redis_server.url + "\n")
    (state / "secret").write_text(SECRET + "\n")
    with make_client(state_dir=state) as found:
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
    ids = [client.submit(ServiceParamTemplate("true")) for _ in range(16)]
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
