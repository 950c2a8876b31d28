"""Process supervision with real programs: timeouts, cancel, concurrency, logs, exit status,
retries, misbehaving callbacks and shutdown."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from soaf import ServiceParamTemplate, UnknownService
from soaf.core.routing import holders, streams
from tests.conftest import wait_until


def pending(client) -> int:
    """Entries delivered to cores and not finished yet, across every queue."""
    held = holders(client.redis, streams(client.redis, client.keys))
    return sum(sum(counts.values()) for counts in held.values())


def unread(client) -> int:
    """Entries still in the queues (an acknowledged entry is deleted)."""
    return sum(client.redis.xlen(name) for name in streams(client.redis, client.keys))


def alive(pid: int) -> bool:
    """True while ``pid`` exists at all (a zombie counts: it was not reaped)."""
    return Path(f"/proc/{pid}").exists()


def states(client, sid):
    return [e["state"] for e in client.events(sid, follow=False) if "state" in e]


def work_dir(record) -> Path:
    return Path(record.get("work_dir"))


def wait_work_file(client, sid, name, timeout=30) -> str:
    """The text of ``name`` in the service's work dir, once both exist."""
    record = wait_until(lambda: (r := client.status(sid)).get("work_dir") and r, timeout,
                        message=f"{sid} to have a work dir")
    return wait_file(work_dir(record) / name, timeout)


def wait_state(client, sid, state, timeout=30):
    return wait_until(lambda: client.status(sid).state == state, timeout,
                      message=f"{sid} to be {state}")


def wait_file(path: Path, timeout=30) -> str:
    wait_until(path.exists, timeout, message=f"{path} to exist")
    return path.read_text()


# -- timeouts -------------------------------------------------------------------------------


def test_timeout_with_a_program_that_ignores_sigterm(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("stubborn", args={"argv": [60]}, timeout=1.5,
                                             watch_interval=0.2))
    record = client.wait(sid, timeout=30)
    assert record.state == "timed_out", record
    assert record.get("failure") == "timeout"
    assert "timeout (1.5 s)" in record.error and "SIGKILL" in record.error
    assert record.get("signal") == "SIGKILL" and record.get("stopped_with") == "SIGKILL"
    # it got SIGTERM first, ignored it, and was killed after the grace period (1 s)
    assert (work_dir(record) / "signals.txt").read_text().split() == ["SIGTERM"]
    assert record.get("wall_time") >= 1.5 + 1.0
    assert not alive(int((work_dir(record) / "pid.txt").read_text()))
    assert (work_dir(record) / "callbacks.txt").read_text().split() == ["after"]
    assert record.fields["after_calls"] == 1
    assert record.fields["after_outcome"] == "timed_out"
    assert record.fields["after_exit_signal"] == "SIGKILL"


def test_service_default_timeout(start_core, client):
    start_core()
    record = client.wait(client.submit(ServiceParamTemplate("short-timeout",
                                                            args={"argv": [60]})), timeout=30)
    assert record.state == "timed_out"
    assert "timeout (1 s)" in record.error
    # a template's timeout wins over the service's default
    record = client.wait(client.submit(ServiceParamTemplate("short-timeout", args={"argv": [2]},
                                                            timeout=30)), timeout=30)
    assert record.state == "succeeded"


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_while_queued_never_starts(start_core, client):
    core = start_core(SOAF_MAX_SERVICES="1")
    busy = client.submit(ServiceParamTemplate("sleep", args={"seconds": 60}))
    wait_state(client, busy, "running")
    queued = client.submit(ServiceParamTemplate("sleep", args={"seconds": 1}))
    time.sleep(0.5)  # the core is full: the second one stays queued
    assert client.status(queued).state == "queued"
    assert client.cancel(queued) == "cancelled (it was queued and never started)"
    record = client.status(queued)
    assert record.state == "cancelled" and record.error == "cancelled before it started"
    assert "will end cancelled" in client.cancel(busy)
    assert client.wait(busy, timeout=30).state == "cancelled"
    # the core takes the cancelled entry later, acknowledges it, and never runs it (the
    # entry must be gone: "none pending" alone also holds before the core has read it)
    wait_until(lambda: pending(client) == 0 and not unread(client), 20,
               message="both entries acknowledged")
    assert states(client, queued) == ["queued", "cancelled"]
    assert client.status(queued).get("building_at") is None
    assert client.redis.ttl(client.keys.service(queued)) > 0  # it ages like any final record
    assert core.alive()


def test_cancel_while_building_stops_before_spawning(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("slowbuild", args={"build_seconds": 60}))
    wait_state(client, sid, "building")
    wait_work_file(client, sid, "build-started")
    started = time.monotonic()
    assert "it was building" in client.cancel(sid)
    record = client.wait(sid, timeout=30)
    assert time.monotonic() - started < 15  # not the 60 s of the build
    assert record.state == "cancelled"
    assert record.error.startswith("cancelled while building, before it started")
    assert "build did not return; abandoned" in record.error
    assert record.get("pid") is None and "running" not in states(client, sid)
    assert not (work_dir(record) / "build-finished").exists()
    assert (work_dir(record) / "callbacks.txt").read_text().split() == ["after"]
    assert record.fields["after_outcome"] == "cancelled"


def test_cancel_while_running_kills_the_forked_child_too(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("forker", args={"argv": [300]}))
    wait_state(client, sid, "running")
    parent, child = map(int, wait_work_file(client, sid, "pids.txt").split())
    assert alive(parent) and alive(child)
    client.cancel(sid)
    record = client.wait(sid, timeout=30)
    assert record.state == "cancelled" and record.error == "cancelled while running"
    assert record.get("failure") is None
    # the child ignores SIGTERM: it goes with the group's SIGKILL, and is reaped
    wait_until(lambda: not alive(parent) and not alive(child), 10,
               message="both processes gone and reaped")
    assert record.fields["after_calls"] == 1


def test_cancel_answers_for_finished_and_unknown_ids(start_core, client):
    core = start_core()
    sid = client.submit(ServiceParamTemplate("true"))
    assert client.wait(sid, timeout=30).state == "succeeded"
    assert client.cancel(sid) == "already succeeded; nothing to cancel"
    with pytest.raises(UnknownService):
        client.cancel("no-such-service")
    # a raw control message naming an unknown id does not trouble the core
    client.redis.xadd(client.keys.control, {"type": "cancel", "id": "no-such-service"})
    assert client.wait(client.submit(ServiceParamTemplate("true")), timeout=30).state == "succeeded"
    assert core.alive()
    assert client.redis.hlen(client.keys.cancels) == 0


def test_cancel_is_durable_across_a_core_restart(start_core, client):
    """A cancel issued while the owning core is down is applied when it comes back."""
    core = start_core()
    sid = client.submit(ServiceParamTemplate("stubborn", args={"argv": [300]}))
    wait_state(client, sid, "running")
    pid = int(wait_work_file(client, sid, "pid.txt"))
    core.kill()  # kill -9: no chance to see anything
    try:
        assert "will end cancelled" in client.cancel(sid)
        assert client.redis.hexists(client.keys.cancels, sid)
        start_core()  # same node: it re-takes the entries it had
        record = client.wait(sid, timeout=30)
        assert record.state == "cancelled"
        assert not client.redis.hexists(client.keys.cancels, sid)
    finally:
        if alive(pid):  # the program of the killed core is not this test's subject
            os.kill(pid, signal.SIGKILL)


def test_cancel_reaches_a_core_that_was_frozen(start_core, client):
    core = start_core()
    sid = client.submit(ServiceParamTemplate("sleep", args={"seconds": 300}))
    wait_state(client, sid, "running")
    core.signal(signal.SIGSTOP)
    try:
        client.cancel(sid)
        time.sleep(1)
        assert client.status(sid).state == "running"
    finally:
        core.signal(signal.SIGCONT)
    assert client.wait(sid, timeout=30).state == "cancelled"


# -- concurrency ----------------------------------------------------------------------------


def max_overlap(intervals):
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def test_two_cores_never_exceed_their_limit(start_core, client):
    limit = 2
    start_core(SOAF_NODE="core-a", SOAF_MAX_SERVICES=str(limit))
    start_core(SOAF_NODE="core-b", SOAF_MAX_SERVICES=str(limit))
    ids = [client.submit(ServiceParamTemplate("sleep", args={"seconds": 1})) for _ in range(10)]
    records = client.wait_all(ids, timeout=90)
    assert all(r.state == "succeeded" for r in records)
    by_node: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        by_node.setdefault(r.node, []).append((r.get("building_at"), r.get("finished_at")))
    assert set(by_node) == {"core-a", "core-b"}
    for node, intervals in by_node.items():
        assert max_overlap(intervals) <= limit, (node, sorted(intervals))


# -- logs -----------------------------------------------------------------------------------


def test_megabytes_of_output_keep_a_capped_tail(start_core, client):
    cap = 64 * 1024
    start_core(SOAF_LOG_MAX_BYTES=str(cap), SOAF_LOG_INTERVAL="0.05")
    sid = client.submit(ServiceParamTemplate("chatty", args={"argv": [8_000_000]}))
    record = client.wait(sid, timeout=60)
    assert record.state == "succeeded"
    stdout = work_dir(record) / "stdout.log"
    data = stdout.read_bytes()
    assert len(data) <= cap and os.stat(stdout).st_blocks * 512 <= cap + 4096
    last = data.decode().splitlines()
    assert last[-1].startswith("END ") and last[0].startswith("line ")  # whole lines
    end = int(last[-1].split()[1])
    assert last[-2].startswith(f"line {end:09d}")
    assert record.get("stdout_bytes") == len(data)
    assert record.get("stdout_dropped_bytes") > 7_000_000
    tail = client.log_lines(sid, tail=3, streams=["stdout"])
    assert [str(line) for line in tail][-1] == f"END {end}"
    assert [line.text[:14] for line in tail[:2]] == [f"line {end - 1:09d}", f"line {end:09d}"]
    assert [line.text for line in client.log_lines(sid, tail=5, streams=["stderr"])] == ["chatty done"]
    assert len(client.log_lines(sid, tail=100_000)) <= 1100  # Redis keeps ~log_lines lines


def test_follow_logs_streams_lines_until_the_end(start_core, client):
    start_core(SOAF_LOG_INTERVAL="0.05")
    sid = client.submit(ServiceParamTemplate("lines", args={"argv": [15, 0.1]}))
    seen = [line.text for line in client.follow_logs(sid, tail=0, timeout=60)]
    assert seen == [f"tick {i}" for i in range(15)]
    assert client.status(sid).state == "succeeded"
    with pytest.raises(UnknownService):
        client.log_lines("no-such-service")


# -- exit status ----------------------------------------------------------------------------


def test_exit_status_classification(start_core, client):
    start_core()
    cases = {
        "exit3ok": ServiceParamTemplate("exit3ok"),
        "noexec": ServiceParamTemplate("noexec"),
        "badcwd": ServiceParamTemplate("badcwd"),
        "missing": ServiceParamTemplate("missing"),
        "selfsignal": ServiceParamTemplate("selfsignal"),
        # Long enough to be sampled (peak memory is the program group's, sampled).
        "burner": ServiceParamTemplate("burner", args={"argv": [0.8, 40]}),
    }
    ids = {name: client.submit(t) for name, t in cases.items()}
    r = {name: client.wait(sid, timeout=60) for name, sid in ids.items()}
    assert r["exit3ok"].state == "succeeded" and r["exit3ok"].exit_code == 3
    assert r["noexec"].state == "failed" and r["noexec"].get("failure") == "start"
    assert "permission denied running ./script.sh (is it executable?)" in r["noexec"].error
    assert r["badcwd"].get("failure") == "start"
    assert "working directory" in r["badcwd"].error and "does not exist" in r["badcwd"].error
    assert r["missing"].get("failure") == "start"
    assert "executable not found: ./no-such-program" in r["missing"].error
    assert r["selfsignal"].state == "failed" and r["selfsignal"].get("failure") == "signal"
    assert r["selfsignal"].get("signal") == "SIGUSR1" and r["selfsignal"].exit_code is None
    assert r["selfsignal"].error == "killed by SIGUSR1"
    burner = r["burner"]
    assert burner.state == "succeeded"
    assert burner.get("cpu_time") >= 0.75 and burner.get("max_rss_kb") >= 40 * 1024
    assert burner.get("wall_time") >= burner.get("cpu_time") * 0.9
    for name in ("noexec", "badcwd", "missing"):
        assert r[name].fields["file_count"] >= 0  # after_watch ran even though nothing started


def test_memory_limit_kills_and_classifies(start_core, client):
    start_core()
    record = client.wait(client.submit(ServiceParamTemplate("memhog", args={"argv": [400]})),
                         timeout=60)
    assert record.state == "failed" and record.get("failure") == "memory", record
    assert "over its memory limit of 60 MiB" in record.error
    assert record.get("signal") == "SIGKILL"
    # the template's limit wins over the service's
    record = client.wait(client.submit(ServiceParamTemplate(
        "memhog", args={"argv": [400]}, max_memory_mb=30)), timeout=60)
    assert "memory limit of 30 MiB" in record.error


# -- retries --------------------------------------------------------------------------------


def test_retry_then_success_in_a_fresh_dir(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("flaky", args={"fail": 1}))
    record = client.wait(sid, timeout=60)
    assert record.state == "succeeded", record
    assert record.attempt == 2
    attempts = record.get("attempts")
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert attempts[0]["state"] == "failed" and attempts[0]["failure"] == "exit_code"
    assert attempts[0]["exit_code"] == 1 and attempts[1]["state"] == "succeeded"
    assert states(client, sid) == ["queued", "building", "preparing", "running", "retrying",
                                   "building", "preparing", "running", "succeeded"]
    assert record.error is None and record.exit_code == 0
    # fresh: attempt 2 ran in a new dir; attempt 1's dir is kept beside it
    old = Path(attempts[0]["work_dir"] + ".attempt1")
    assert (old / "attempts.txt").read_text() == "attempt 1\n"
    assert (work_dir(record) / "attempts.txt").read_text() == "attempt 2\n"
    assert "failing on purpose" in (old / "stderr.log").read_text()
    lines = client.log_lines(sid, tail=10)
    assert [(line.attempt, line.text) for line in lines if line.stream != "soaf"] == [
        (1, "failing on purpose in attempt 1"), (2, "fine in attempt 2")]
    # after_watch ran once per attempt
    assert (old / "callbacks.txt").read_text().split() == ["after"]
    assert (work_dir(record) / "callbacks.txt").read_text().split() == ["after"]


def test_retries_run_out_and_reuse_policy(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("flaky-reuse", args={"fail": 5}, retries=1,
                                             retry_backoff=0.1))
    record = client.wait(sid, timeout=60)
    assert record.state == "failed" and record.attempt == 2
    assert [a["state"] for a in record.get("attempts")] == ["failed", "failed"]
    assert (work_dir(record) / "attempts.txt").read_text() == "attempt 1\nattempt 2\n"
    retrying = [e for e in client.events(sid, follow=False) if e.get("state") == "retrying"]
    assert len(retrying) == 1 and retrying[0]["retry_at"] >= retrying[0]["retrying_at"] + 0.09
    # opt-in: a service without retries does not retry
    record = client.wait(client.submit(ServiceParamTemplate("flaky-noretry")), timeout=60)
    assert record.state == "failed" and record.attempt == 1


def test_cancel_during_retry_backoff(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("flaky", args={"fail": 5}, retry_backoff=60))
    wait_state(client, sid, "retrying")
    client.cancel(sid)
    record = client.wait(sid, timeout=30)
    assert record.state == "cancelled" and record.error == "cancelled while waiting to retry"
    assert record.attempt == 1


# -- callbacks that misbehave ---------------------------------------------------------------


def test_file_change_callback_that_raises(start_core, client):
    start_core()
    record = client.wait(client.submit(ServiceParamTemplate("cb-raise", args={"seconds": 1.5},
                                                            watch_interval=0.1)), timeout=30)
    assert record.state == "succeeded"
    assert record.fields["change_calls"] >= 3  # the watcher carried on
    assert "ValueError: file_change_callback broke on purpose" in record.get("callback_error")
    assert "in file_change_callback" in record.get("callback_traceback")
    assert "raise ValueError" in record.get("callback_traceback")
    assert record.fields["after_ran"] is True


def test_after_watch_callback_that_raises(start_core, client):
    start_core()
    record = client.wait(client.submit(ServiceParamTemplate("cb-after-raise")), timeout=30)
    assert record.state == "failed" and record.get("failure") == "callback"
    assert "RuntimeError: after_watch_callback broke on purpose" in record.get("callback_error")
    assert record.exit_code == 0


def test_hanging_callbacks_block_nothing(start_core, client):
    start_core(SOAF_CALLBACK_TIMEOUT="2")
    hang = client.submit(ServiceParamTemplate("cb-hang", args={"seconds": 1}, watch_interval=0.1))
    after_hang = client.submit(ServiceParamTemplate("cb-after-hang", args={"seconds": 0.5}))
    # others run meanwhile
    assert client.wait(client.submit(ServiceParamTemplate("true")), timeout=30).state == "succeeded"
    # the exit is recorded while file_change_callback still hangs, not when it is given up
    wait_until(lambda: client.status(hang).exit_code == 0, 20, message="exit recorded")
    record = client.wait(hang, timeout=30)
    assert record.state == "succeeded"
    events = list(client.events(hang, follow=False))
    exited = next(e for e in events if "exited_at" in e)
    assert events[-1]["ts"] - exited["ts"] >= 1.5  # the 2 s budget ran after the exit
    assert "file_change_callback did not return within 2 s" in record.get("callback_error")
    assert (work_dir(record) / "callbacks.txt").read_text().split() == ["change", "after"]
    assert record.fields["after_ran"] is True
    record = client.wait(after_hang, timeout=30)
    assert record.state == "failed" and record.get("failure") == "callback"
    assert record.error == "after_watch_callback did not return within 2 s"
    assert (work_dir(record) / "callbacks.txt").read_text().split() == ["after"]


def test_timeout_and_cancel_while_a_callback_hangs(start_core, client):
    """The service's thread is stuck in before_watch_callback: the program is stopped
    anyway, and the service ends once the callback has had its grace."""
    start_core(SOAF_CALLBACK_TIMEOUT="2")
    timed = client.submit(ServiceParamTemplate("cb-before-hang", args={"seconds": 300},
                                               timeout=1))
    cancelled = client.submit(ServiceParamTemplate("cb-before-hang", args={"seconds": 300}))
    wait_work_file(client, cancelled, "callbacks.txt")
    client.cancel(cancelled)
    record = client.wait(cancelled, timeout=30)
    assert record.state == "cancelled" and record.get("signal") == "SIGTERM"
    assert "before_watch_callback did not return within 1 s" in record.get("callback_error")
    assert (work_dir(record) / "callbacks.txt").read_text().split() == ["before", "after"]
    assert record.fields["after_outcome"] == "cancelled"
    record = client.wait(timed, timeout=30)
    assert record.state == "timed_out" and record.get("signal") == "SIGTERM"
    assert "before_watch_callback did not return within 2 s" in record.get("callback_error")


# -- shutdown -------------------------------------------------------------------------------


def test_sigterm_drains_running_services(start_core, client):
    core = start_core()
    sid = client.submit(ServiceParamTemplate("forker", args={"argv": [2]}))
    wait_state(client, sid, "running")
    parent, child = map(int, wait_work_file(client, sid, "pids.txt").split())
    core.signal(signal.SIGTERM)
    assert core.proc.wait(60) == 0
    record = client.status(sid)
    assert record.state == "succeeded"
    assert not alive(parent) and not alive(child)
    assert pending(client) == 0


def test_sigterm_without_drain_leaves_work_recoverable(start_core, client):
    core = start_core(args=["--no-drain"])
    sid = client.submit(ServiceParamTemplate("forker", args={"argv": [300]}))
    wait_state(client, sid, "running")
    parent, child = map(int, wait_work_file(client, sid, "pids.txt").split())
    core.signal(signal.SIGTERM)
    assert core.proc.wait(60) == 0
    assert not alive(parent) and not alive(child)
    record = client.status(sid)
    assert record.state == "queued" and not record.final
    assert record.get("requeued_because") == "core stopped while it ran"
    assert record.get("signal") in ("SIGTERM", "SIGKILL")  # the program's end is recorded
    assert pending(client) == 1  # not acknowledged
    # a core that comes back runs it again, as attempt 2
    start_core()
    record = wait_until(lambda: (r := client.status(sid)).state == "running" and r, 30,
                        message="the service to run again")
    assert record.attempt == 2
    client.cancel(sid)
    assert client.wait(sid, timeout=30).state == "cancelled"


def test_second_sigint_forces_the_stop(start_core, client):
    core = start_core()
    sid = client.submit(ServiceParamTemplate("stubborn", args={"argv": [300]}))
    wait_state(client, sid, "running")
    pid = int(wait_work_file(client, sid, "pid.txt"))
    core.signal(signal.SIGINT)
    time.sleep(1)
    assert core.alive()  # draining: it waits for the program
    core.signal(signal.SIGINT)
    assert core.proc.wait(30) == 0
    assert not alive(pid)
    assert client.status(sid).state == "queued"
    assert pending(client) == 1


def test_stop_without_drain_during_a_slow_build(start_core, client):
    core = start_core(args=["--no-drain"])
    sid = client.submit(ServiceParamTemplate("slowbuild", args={"build_seconds": 60}))
    wait_work_file(client, sid, "build-started")
    core.signal(signal.SIGTERM)
    assert core.proc.wait(30) == 0  # the hung build is abandoned after the grace period
    record = client.status(sid)
    assert record.state == "queued"
    assert record.get("requeued_because") == (
        "core stopped while building, before it started (build did not return; abandoned)")
    assert pending(client) == 1


def test_forced_stop_while_a_callback_hangs(start_core, client):
    core = start_core()
    sid = client.submit(ServiceParamTemplate("cb-before-hang", args={"seconds": 300}))
    pid = wait_until(lambda: client.status(sid).get("pid"), 30, message="the program's pid")
    wait_work_file(client, sid, "callbacks.txt")  # before_watch_callback now hangs
    core.signal(signal.SIGINT)
    wait_until(lambda: "draining" in core.log(), 20, message="the core to start draining")
    core.signal(signal.SIGINT)  # (two signals at once would count as one)
    assert core.proc.wait(30) == 0
    assert not alive(pid)
    record = client.status(sid)
    assert record.state == "queued" and record.get("requeued_because") == "core stopped while it ran"
    assert pending(client) == 1


def test_retry_on_limits_what_is_retried(start_core, client):
    start_core()
    record = client.wait(client.submit(ServiceParamTemplate("flaky-timeouts-only")), timeout=60)
    assert record.state == "failed" and record.attempt == 1
    assert [a["failure"] for a in record.get("attempts")] == ["exit_code"]


def test_attempts_survive_a_core_restart_during_the_backoff(start_core, client):
    core = start_core(args=["--no-drain"])
    sid = client.submit(ServiceParamTemplate("flaky", args={"fail": 1}, retry_backoff=60))
    wait_state(client, sid, "retrying")
    core.signal(signal.SIGTERM)
    assert core.proc.wait(30) == 0
    record = client.status(sid)
    assert record.state == "queued"
    assert record.get("requeued_because") == "core stopped before a retry"
    start_core()
    record = client.wait(sid, timeout=60)
    assert record.state == "succeeded" and record.attempt == 2
    assert [(a["attempt"], a["state"]) for a in record.get("attempts")] == [
        (1, "failed"), (2, "succeeded")]
