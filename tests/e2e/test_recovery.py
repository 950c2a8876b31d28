"""Crashes and outages caused for real: kill -9 of cores, a stopped redis-server, a killed
embedded Redis, duplicate submissions, a full disk. Nothing accepted may be lost, no
service may run twice at once, after_watch_callback runs once per service."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import soaf
from soaf import ServiceParamTemplate
from soaf.errors import DuplicateService, RedisUnavailable
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.state import FINAL_VALUES
from tests.conftest import SECRET, until_waiting, wait_until


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    path = tmp_path / "hold-log"
    path.mkdir()
    return path


def hold(client, logdir: Path, seconds: float, *, retries: int = 0, code: int = 0,
         until: str = "", **kw) -> str:
    args = {"seconds": seconds, "logdir": str(logdir), "code": code, "until": until}
    return client.submit(ServiceParamTemplate("hold", args=args, retries=retries,
                                              watch_interval=0.2, **kw))


def lines(logdir: Path, name: str) -> list[list[str]]:
    try:
        return [line.split() for line in (logdir / name).read_text().splitlines()]
    except FileNotFoundError:
        return []


def starts(logdir: Path, sid: str) -> int:
    return sum(1 for w in lines(logdir, "runs.log") if w[0] == "start" and w[1] == sid)


def afters(logdir: Path, sid: str) -> list[list[str]]:
    return [w for w in lines(logdir, "callbacks.log") if w[0] == "after" and w[1] == sid]


def running_on(client, ids: list[str], node: str) -> list[str]:
    return [sid for sid in ids if (r := client.status(sid)).state == "running" and r.node == node]


def history(client, sid: str) -> list[dict]:
    """The service's events, checked: seq strictly increasing, exactly one final event,
    and the running intervals of its attempts do not overlap."""
    events = list(client.events(sid, follow=False))
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), f"{sid}: seq not strictly increasing: {seqs}"
    finals = [e for e in events if e.get("state") in FINAL_VALUES]
    assert len(finals) == 1, f"{sid}: {len(finals)} final events: {events}"
    spans: dict[int, list[float]] = {}
    for e in events:
        if e.get("state") == "running" and e["attempt"] not in spans:
            spans[e["attempt"]] = [e["ts"], float("inf")]
        if e["attempt"] in spans and (e.get("state") in ("lost", *FINAL_VALUES)
                                      or "exited_at" in e):
            spans[e["attempt"]][1] = min(spans[e["attempt"]][1], e["ts"])
    ordered = sorted(spans.values())
    for (_, end), (start, _) in itertools.pairwise(ordered):
        assert end <= start, f"{sid}: two attempts ran at once: {spans}"
    return events


def no_overlap(logdir: Path) -> None:
    overlaps = [w for w in lines(logdir, "runs.log") if w[0] == "overlap"]
    assert not overlaps, f"a service ran twice at the same time: {overlaps}"


def test_kill_core_while_another_is_alive(start_core, client, logdir):
    """5 running + 5 queued on a core killed with -9: the survivor on the same host adopts
    the five programs still running (nothing is run again) and runs the queued ones."""
    b = start_core(SOAF_NODE="core-b", SOAF_MAX_SERVICES="5")
    release = logdir / "release"
    blockers = [hold(client, logdir, 0, until=str(release)) for _ in range(5)]
    wait_until(lambda: len(running_on(client, blockers, "core-b")) == 5, 30,
               message="core-b busy with 5 blockers")
    a = start_core(SOAF_NODE="core-a", SOAF_MAX_SERVICES="5")
    # core-a reads the first five (core-b is full); the other five wait in the stream.
    ids = [hold(client, logdir, 10 if i < 5 else 1) for i in range(10)]
    on_a = wait_until(lambda: (r := running_on(client, ids, "core-a")) and len(r) == 5 and r,
                      30, message="5 services running on core-a")
    a.kill()
    release.write_text("go")
    records = client.wait_all(ids + blockers, timeout=120)
    assert all(r.state == "succeeded" for r in records), [(r.state, r.error) for r in records]
    for sid in ids:
        events = history(client, sid)
        record = client.status(sid)
        assert record.node == "core-b" and record.attempt == 1
        assert not [e for e in events if e.get("state") == "lost"]
        if sid in on_a:
            assert record.get("recovered_as") in ("adopt", "collect"), record.raw
            assert record.get("recovered_from") == "core-a"
        assert starts(logdir, sid) == 1, sid
        assert len(afters(logdir, sid)) == 1
    no_overlap(logdir)
    assert "took over" in b.log()
    assert "stopping the program of service" not in b.log()  # adopted, not stopped


def test_kill_only_core_and_restart_readopts(start_core, client, logdir):
    """The restarted core re-adopts the programs still running: none is run again."""
    a = start_core(SOAF_MAX_SERVICES="5")
    ids = [hold(client, logdir, 4) for _ in range(10)]  # retries=0: a re-run would fail
    first = wait_until(lambda: (r := running_on(client, ids, "core-a")) and len(r) == 5 and r,
                       30, message="5 running")
    wait_until(lambda: all(client.status(s).fields.get("ticks") for s in first), 30,
               message="handlers have seen files")
    a.kill()
    a2 = start_core()
    assert "waiting up to" not in a2.log()  # the dead pid is verified: no TTL wait
    records = client.wait_all(ids, timeout=90)
    assert all(r.state == "succeeded" for r in records), [(r.state, r.error) for r in records]
    for sid in ids:
        history(client, sid)
        record = client.status(sid)
        assert record.attempt == 1
        assert starts(logdir, sid) == 1, sid
        assert len(afters(logdir, sid)) == 1, sid
        if sid in first:
            assert record.get("recovered_as") == "adopt"
            assert record.exit_code == 0
            assert record.fields["befores"] == 2  # restored field, then incremented again
            assert record.fields["final_ticks"] >= 15  # the whole run's files, one work dir
    no_overlap(logdir)


def test_programs_ended_while_core_was_down_are_collected(start_core, client, logdir):
    a = start_core()
    ok = hold(client, logdir, 1.0)
    bad = hold(client, logdir, 1.0, code=3)
    wait_until(lambda: len(running_on(client, [ok, bad], "core-a")) == 2, 30, message="running")
    a.kill()
    wait_until(lambda: sum(1 for w in lines(logdir, "runs.log") if w[0] == "end") == 2, 30,
               message="both programs to end with no core")
    start_core()
    good, failed = client.wait_all([ok, bad], timeout=60)
    assert good.state == "succeeded" and good.exit_code == 0
    assert failed.state == "failed" and failed.exit_code == 3, failed.error
    for record in (good, failed):
        history(client, record.service_id)
        assert record.attempt == 1
        assert record.get("recovered_as") == "collect"
        assert len(afters(logdir, record.service_id)) == 1
        journal = record.get("journal")
        assert journal["steps"] == ["built", "prepared", "running", "exited", "collected"]
        assert journal["process"]["start_time"] > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_long_service_on_live_core_is_never_taken_over(start_core, client, logdir):
    a = start_core(SOAF_NODE="core-a")
    sid = hold(client, logdir, 60)
    wait_until(lambda: running_on(client, [sid], "core-a"), 30, message="running on core-a")
    b = start_core(SOAF_NODE="core-b")
    record = client.wait(sid, timeout=150)
    assert record.state == "succeeded" and record.attempt == 1 and record.node == "core-a"
    events = history(client, sid)
    assert not [e for e in events if e.get("state") == "lost"]
    assert starts(logdir, sid) == 1
    assert "took over" not in b.log() and a.alive()


def test_same_node_name_twice_is_refused(start_core, client, logdir):
    a = start_core()
    twin = start_core(wait_ready=False)
    wait_until(lambda: not twin.alive(), 30, message="the twin to give up")
    assert twin.proc.returncode != 0
    assert "in use by a running core" in twin.log()
    assert a.alive()
    assert client.wait(hold(client, logdir, 0.2), timeout=30).node == "core-a"


def test_heartbeat_from_another_host_is_waited_out(start_core, redis_server, prefix, client,
                                                   logdir):
    """A heartbeat that /proc cannot check: wait for it to expire, refuse if refreshed."""
    r = redis_server.client()
    key = Keys(prefix).node("core-a")
    foreign = '{"node": "core-a", "host": "elsewhere", "pid": 1, "boot_id": "x", "ts": 1}'
    r.set(key, foreign, px=2500)
    a = start_core()
    assert "waiting up to" in a.log()
    assert client.wait(hold(client, logdir, 0.2), timeout=30).node == "core-a"
    a.stop()

    r.set(key, foreign, px=3000)
    refreshed = threading.Event()
    def refresh() -> None:
        for i in range(40):
            r.set(key, foreign.replace('"ts": 1', f'"ts": {i + 2}'), px=3000)
            time.sleep(0.1)
        refreshed.set()
    threading.Thread(target=refresh, daemon=True).start()
    twin = start_core(wait_ready=False)
    wait_until(lambda: not twin.alive(), 30, message="the core to refuse")
    assert "keeps its heartbeat alive" in twin.log()
    refreshed.wait(10)


def test_frozen_core_is_replaced_and_its_late_writes_are_fenced(start_core, client, logdir):
    """A core stopped (SIGSTOP) past its TTL looks dead: its work is taken over. When it
    wakes up, its writes for the old attempt are refused and it does not collect."""
    a = start_core(SOAF_NODE="core-a", SOAF_MAX_SERVICES="1")
    ids = [hold(client, logdir, 6, retries=1)]  # core-a takes it: the survivor starts after
    sid = wait_until(lambda: running_on(client, ids, "core-a"), 30, interval=0.3,
                     message="a service on core-a")[0]
    start_core(SOAF_NODE="core-b")
    a.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: client.status(sid).attempt == 2, 30, message="takeover")
    finally:
        a.signal(signal.SIGCONT)
    record = client.wait(sid, timeout=60)
    assert record.state == "succeeded" and record.attempt == 2 and record.node == "core-b"
    wait_until(lambda: "fenced out" in a.log() or "taken over by attempt" in a.log(), 30,
               message="core-a to notice")
    client.wait_all(ids, timeout=60)
    events = history(client, sid)
    assert [e["attempt"] for e in events if e.get("state") in FINAL_VALUES] == [2]
    assert [w[2] for w in afters(logdir, sid)] == ["2"]
    no_overlap(logdir)
    assert a.alive()


def test_redis_outage_keeps_events_in_order(start_core, own_redis, prefix, logdir):
    core = start_core(SOAF_REDIS_URL=own_redis.url)
    client = soaf.Client(own_redis.url, secret=SECRET, prefix=prefix)
    ids = [client.submit(ServiceParamTemplate("steps", args={"n": 10, "delay": 0.4},
                                              watch_interval=0.1)) for _ in range(4)]
    ids += [hold(client, logdir, 3) for _ in range(2)]
    wait_until(lambda: len(running_on(client, ids, "core-a")) == len(ids), 30,
               message="all running")
    waited: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: waited.update(r=client.wait(ids[0], timeout=90)))
    waiter.start()
    until_waiting(client)  # (the outage begins once the wait can ride it out)
    own_redis.stop()
    try:
        with pytest.raises(RedisUnavailable):
            client.submit(ServiceParamTemplate("steps"))
        time.sleep(5)  # the outage itself
    finally:
        own_redis.start()
    records = client.wait_all(ids, timeout=90)
    assert all(r.state == "succeeded" for r in records), [(r.state, r.error) for r in records]
    for sid in ids:
        events = history(client, sid)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # none lost
        assert client.status(sid).attempt == 1
    progress = [e["progress"] for e in history(client, ids[0]) if "progress" in e]
    assert progress == sorted(progress) and progress[-1] == 1.0
    waiter.join(30)
    assert getattr(waited.get("r"), "state", None) == "succeeded"  # wait() rode it out
    log = core.log()
    assert "Redis unreachable" in log and "Redis is back" in log
    # Work submitted after the outage still runs.
    assert client.wait(hold(client, logdir, 0.2), timeout=30).state == "succeeded"
    client.close()


def test_callback_done_but_final_unwritten_is_not_run_again_by_a_survivor(
        start_core, own_redis, prefix, logdir, work_root):
    """Redis is away when the program ends: the core runs after_watch_callback, keeps the
    final state in memory, and is killed. The survivor that takes the service over finds
    the dead core's journal (same machine) and writes that final state: no second call."""
    client = soaf.Client(own_redis.url, secret=SECRET, prefix=prefix)
    a = start_core(SOAF_NODE="core-a", SOAF_MAX_SERVICES="1", SOAF_REDIS_URL=own_redis.url)
    ids = [hold(client, logdir, 2)]  # core-a takes it: the survivor starts after
    sid = wait_until(lambda: running_on(client, ids, "core-a"), 30, interval=0.3,
                     message="a service on core-a")[0]
    start_core(SOAF_NODE="core-b", SOAF_REDIS_URL=own_redis.url)
    own_redis.stop()
    try:
        wait_until(lambda: afters(logdir, sid), 30, message="the callback during the outage")
        journal = work_root / ".soaf-runs" / "core-a" / f"{sid}.1.json"
        wait_until(lambda: journal.exists() and '"collected"' in journal.read_text(), 30,
                   message="the callback's return in the journal")
        a.kill()
    finally:
        own_redis.start()
    record = client.wait(sid, timeout=60)
    assert record.state == "succeeded" and record.attempt == 1
    assert record.node == "core-b" and record.get("recovered_as") == "collected"
    assert len(afters(logdir, sid)) == 1 and starts(logdir, sid) == 1
    history(client, sid)
    client.wait_all(ids, timeout=60)
    client.close()


def test_embedded_redis_killed_then_core_restarted(start_core, tmp_path, prefix, logdir):
    state = tmp_path / "state"
    a = start_core(SOAF_REDIS_URL="")
    client = soaf.Client(state_dir=state, secret=SECRET, prefix=prefix)
    ids = [hold(client, logdir, 3) for _ in range(4)]
    wait_until(lambda: len(running_on(client, ids, "core-a")) == 4, 30, message="running")
    # Cut off at any step by the kills: these may need a second attempt.
    later = [hold(client, logdir, 0.5, retries=1) for _ in range(3)]
    client.close()
    os.kill(int((state / "redis.pid").read_text()), signal.SIGKILL)
    a.kill()
    a2 = start_core(SOAF_REDIS_URL="")
    client = soaf.Client(state_dir=state, secret=SECRET, prefix=prefix)
    records = client.wait_all(ids + later, timeout=90)
    assert all(r.state == "succeeded" for r in records), [(r.state, r.error) for r in records]
    for sid in ids + later:
        history(client, sid)
        assert len(afters(logdir, sid)) == 1
    for sid in ids:  # their programs ran on: collected or re-adopted, never run again
        assert starts(logdir, sid) == 1 and client.status(sid).attempt == 1
    assert "re-taking" in a2.log()
    client.close()


def test_embedded_redis_killed_under_a_running_core_is_restarted(start_core, tmp_path, prefix,
                                                                 logdir):
    state = tmp_path / "state"
    core = start_core(SOAF_REDIS_URL="")
    client = soaf.Client(state_dir=state, secret=SECRET, prefix=prefix)
    ids = [hold(client, logdir, 3) for _ in range(3)]
    wait_until(lambda: len(running_on(client, ids, "core-a")) == 3, 30, message="running")
    old_pid = int((state / "redis.pid").read_text())
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: "starting it again" in core.log(), 30, message="the core to restart it")
    records = client.wait_all(ids, timeout=60)
    assert all(r.state == "succeeded" and r.attempt == 1 for r in records)
    for sid in ids:
        events = history(client, sid)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert int((state / "redis.pid").read_text()) != old_pid
    client.close()


def test_stream_and_group_gone_the_core_carries_on(start_core, client, redis_server, prefix,
                                                   logdir):
    """Redis came back without data (no persistence): queues and groups are made again."""
    core = start_core()
    assert client.wait(hold(client, logdir, 0.1), timeout=30).state == "succeeded"
    r, keys = redis_server.client(), Keys(prefix)
    r.delete(keys.queue("hold", 0), keys.queues)
    assert client.wait(hold(client, logdir, 0.1), timeout=30).state == "succeeded"
    r.xgroup_destroy(keys.queue("hold", 0), GROUP)  # the stream without its group
    assert client.wait(hold(client, logdir, 0.1), timeout=30).state == "succeeded"
    assert core.alive()


def test_duplicate_submissions_run_once(start_core, client, redis_server, prefix, logdir):
    start_core()
    sid = hold(client, logdir, 0.5, service_id="dup-1")
    with pytest.raises(DuplicateService):
        hold(client, logdir, 0.5, service_id="dup-1")
    # Plain redis-py has no submit script: both entries reach the cores.
    r = redis_server.client()
    t = ServiceParamTemplate("hold", service_id="dup-2",
                             args={"seconds": 0.5, "logdir": str(logdir)})
    payload = soaf.dumps(t, SECRET)
    r.xadd(f"{prefix}:submit", {"payload": payload})
    r.xadd(f"{prefix}:submit", {"payload": payload})
    for service_id in (sid, "dup-2"):
        assert client.wait(service_id, timeout=30).state == "succeeded"
        history(client, service_id)
        assert starts(logdir, service_id) == 1
    # Both went through the old submit stream to the queue; both are acknowledged there.
    wait_until(lambda: r.xpending(Keys(prefix).queue("hold", 0), GROUP)["pending"] == 0
               and r.xlen(Keys(prefix).queue("hold", 0)) == r.xlen(f"{prefix}:submit") == 0, 10,
               message="the duplicate entry to be acknowledged")


def test_work_dir_that_cannot_be_created_fails_the_service(start_core, client, work_root):
    core = start_core()
    (work_root / "blocked").write_text("a regular file where a directory should be")
    record = client.wait(client.submit(ServiceParamTemplate("steps", work_path="blocked/run")),
                         timeout=30)
    assert record.state == "failed"
    assert "Not a directory" in record.error and record.get("failed_in") == "work dir"
    assert client.wait(client.submit(ServiceParamTemplate("steps", args={"n": 1})),
                       timeout=30).state == "succeeded"
    assert core.alive()


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True)
    return result.returncode == 0


def test_full_disk_fails_the_service_and_the_core_carries_on(start_core, client, tmp_path):
    """A work root on a 1 MB tmpfs filled to the last byte: real ENOSPC."""
    root = tmp_path / "small"
    root.mkdir()
    if not _mount_tmpfs(root, "1m"):
        pytest.skip("mounting a size-limited tmpfs needs root")
    try:
        core = start_core(SOAF_WORK_ROOT=str(root))
        filler = root / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        record = client.wait(client.submit(ServiceParamTemplate("steps", args={"n": 1})),
                             timeout=30)
        assert record.state == "failed"
        assert "No space left on device" in record.error, record.error
        filler.unlink()
        assert client.wait(client.submit(ServiceParamTemplate("steps", args={"n": 1})),
                           timeout=30).state == "succeeded"
        assert core.alive()
        core.stop()
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def test_readopted_attempt_that_fails_is_retried(start_core, client, logdir):
    """A re-adopted program that fails counts as its attempt: the retry runs after it,
    and both attempts are in the record's ``attempts``."""
    a = start_core()
    sid = hold(client, logdir, 3, code=1, retries=1, retry_backoff=0.2)
    wait_until(lambda: client.status(sid).fields.get("ticks"), 30, message="running")
    a.kill()
    start_core()
    record = client.wait(sid, timeout=90)
    assert record.state == "failed" and record.get("failure") == "exit_code", record.error
    assert record.attempt == 2
    attempts = record.get("attempts")
    assert [(x["attempt"], x["state"]) for x in attempts] == [(1, "failed"), (2, "failed")]
    assert starts(logdir, sid) == 2
    assert len(afters(logdir, sid)) == 2  # once per attempt, the adopted one included
    history(client, sid)
    no_overlap(logdir)


def test_readopted_program_still_has_its_timeout(start_core, client, logdir, tmp_path):
    """The timeout counts from the program's start, across the core's restart: the new
    core's supervisor stops the adopted program when it runs out."""
    a = start_core()
    sid = hold(client, logdir, 0, until=str(tmp_path / "never"), timeout=6)
    wait_until(lambda: client.status(sid).fields.get("ticks"), 30, message="running")
    a.kill()
    start_core()
    record = client.wait(sid, timeout=90)
    assert record.state == "timed_out", (record.state, record.error)
    assert record.get("recovered_as") == "adopt"
    assert record.get("stopped_with") in ("SIGTERM", "SIGKILL")
    assert starts(logdir, sid) == 1
    assert len(afters(logdir, sid)) == 1
    no_overlap(logdir)


def test_frozen_core_stops_when_a_live_core_took_its_name(start_core, redis_server, prefix,
                                                          client, logdir):
    """A core frozen past its TTL loses its node name to a new core on this host; when it
    wakes up and finds that core alive, it stops instead of fighting over the name."""
    r = redis_server.client()
    key = Keys(prefix).node("core-a")
    a = start_core()
    a.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: r.get(key) is None, 15, message="the heartbeat to expire")
        b = start_core()
    finally:
        a.signal(signal.SIGCONT)
    wait_until(lambda: not a.alive(), 30, message="the frozen core to stop")
    assert "has taken node name core-a over" in a.log()
    assert b.alive() and json.loads(r.get(key))["pid"] == b.proc.pid
    assert client.wait(hold(client, logdir, 0.2), timeout=30).node == "core-a"


@pytest.mark.parametrize(("service", "seconds", "call", "logged"), [
    ("exit_after", 0.2, "after_watch_callback", "after"),
    ("exit_change", 120, "file_change_callback", "change"),
])
def test_core_that_dies_twice_in_a_callback_does_not_call_it_again(
        start_core, client, logdir, service, seconds, call, logged):
    """The callback calls os._exit (file_change_callback while the program runs): the
    restart (re-adopting the program) calls it again and dies too; the next one stops the
    program and ends the service failed (plugin), saying how, and stays up."""
    core = start_core()
    sid = client.submit(ServiceParamTemplate(
        service, args={"seconds": seconds, "logdir": str(logdir), "code": 0, "until": ""},
        watch_interval=0.2))
    wait_until(lambda: not core.alive(), timeout=60, message="the core dies in the callback")
    again = start_core(wait_ready=False)
    wait_until(lambda: not again.alive(), timeout=60, message="the restart dies in it too")
    last = start_core()
    record = client.wait(sid, timeout=60)
    assert (record.state, record.get("failure")) == ("failed", "plugin"), record
    assert record.error == f"the core died twice in {call}"
    assert record.get("recovered_as") == "ended"
    assert (logdir / "callbacks.log").read_text().split().count(logged) == 2
    pid = record.get("pid")
    wait_until(lambda: not _alive(pid), timeout=30, message="its program is stopped")
    time.sleep(1)
    assert last.alive()


def _alive(pid: int | None) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError, TypeError):
        return False
