"""A core's death never fails a service: real cores killed with -9 (alone, or with their
programs, as when a machine dies), survivors on this host and on "another" one.

Another host is simulated with ``SOAF_HOST_ID``: a core with another host id cannot
verify the dead core's processes, exactly as if it ran elsewhere.
"""

from __future__ import annotations

import signal

from tests.conftest import crash, wait_until
from tests.e2e.test_recovery import (  # noqa: F401  (logdir is a fixture)
    afters,
    history,
    hold,
    logdir,
    no_overlap,
    running_on,
    starts,
)


def four_each(client, ids: list[str]) -> tuple[list[str], list[str]]:
    return wait_until(
        lambda: (a := running_on(client, ids, "core-a")) and len(a) == 4
        and len(b := running_on(client, ids, "core-b")) == 4 and (a, b),
        30, interval=0.1, message="four services running on each core")


def test_a_survivor_on_the_same_host_adopts_or_collects_a_dead_cores_services(
        start_core, client, logdir):
    start_core(SOAF_NODE="core-b", SOAF_MAX_SERVICES="4")
    a = start_core(SOAF_NODE="core-a", SOAF_MAX_SERVICES="4")
    ids = [hold(client, logdir, 3) for _ in range(8)]  # default settings: retries 0
    on_a, _ = four_each(client, ids)
    a.kill()
    records = client.wait_all(ids, timeout=90)
    assert all(r.state == "succeeded" for r in records), [(r.state, r.error) for r in records]
    for record in records:
        history(client, record.service_id)
        assert record.attempt == 1 and starts(logdir, record.service_id) == 1
        assert len(afters(logdir, record.service_id)) == 1
        if record.service_id in on_a:
            assert record.node == "core-b"
            assert record.get("recovered_as") in ("adopt", "collect")
            assert record.get("recovered_from") == "core-a"
    no_overlap(logdir)


def test_a_survivor_on_another_host_reruns_lost_services_outside_the_retry_budget(
        start_core, client, logdir):
    start_core(SOAF_NODE="core-b", SOAF_MAX_SERVICES="4", SOAF_HOST_ID="host-b")
    a = start_core(SOAF_NODE="core-a", SOAF_MAX_SERVICES="4", SOAF_HOST_ID="host-a")
    ids = [hold(client, logdir, 3) for _ in range(8)]
    on_a, _ = four_each(client, ids)
    crash(a, client, on_a)  # that host died, its programs with it
    records = client.wait_all(ids, timeout=90)
    assert all(r.state == "succeeded" for r in records), [(r.state, r.error) for r in records]
    for record in records:
        history(client, record.service_id)
        if record.service_id in on_a:
            assert record.attempt == 2 and record.node == "core-b"
            attempts = record.get("attempts")
            assert [(x["attempt"], x["state"]) for x in attempts] == [(1, "lost"), (2, "succeeded")]
            assert attempts[0]["node"] == "core-a" and "heartbeat" in attempts[0]["error"]
        else:
            assert record.attempt == 1


def test_a_crash_loop_ends_failed_once_more_than_max_lost_attempts_are_lost(
        start_core, client, logdir, tmp_path):
    a = start_core()
    sid = hold(client, logdir, 0, until=str(tmp_path / "never"), max_lost=1)
    for attempt in (1, 2):
        wait_until(lambda n=attempt: (r := client.status(sid)).state == "running"
                   and r.attempt == n, 30, message=f"attempt {attempt} running")
        crash(a, client, [sid])
        a = start_core()
    record = client.wait(sid, timeout=60)
    assert record.state == "failed" and record.get("failure") == "lost", record.error
    assert record.error.startswith("lost 2 times: the cores running it kept dying")
    assert "core-a" in record.error
    assert [(x["attempt"], x["state"]) for x in record.get("attempts")] == [
        (1, "lost"), (2, "lost")]
    assert afters(logdir, sid) == []


def test_retries_zero_means_zero_after_a_lost_attempt(start_core, client, logdir, tmp_path):
    a = start_core()
    release = tmp_path / "release"
    sid = hold(client, logdir, 0, until=str(release), code=1, retries=0)
    wait_until(lambda: client.status(sid).state == "running", 30, message="running")
    crash(a, client, [sid])
    start_core()
    wait_until(lambda: (r := client.status(sid)).state == "running" and r.attempt == 2, 30,
               message="the lost attempt re-run")
    release.write_text("go")
    record = client.wait(sid, timeout=60)
    assert record.state == "failed" and record.get("failure") == "exit_code"
    assert record.attempt == 2 and record.exit_code == 1
    assert [(x["attempt"], x["state"]) for x in record.get("attempts")] == [
        (1, "lost"), (2, "failed")]


def test_a_new_attempt_starts_with_a_clean_record(start_core, client, logdir):
    """A core stopped without draining stops the program (its signal is recorded) and
    puts the service back; the next attempt's record shows only its own exit fields."""
    a = start_core(args=["--no-drain"])
    sid = hold(client, logdir, 2)
    wait_until(lambda: client.status(sid).fields.get("ticks"), 30, message="running")
    a.signal(signal.SIGTERM)
    wait_until(lambda: client.status(sid).state == "queued", 30, message="put back")
    assert client.status(sid).get("stopped_with") == "SIGTERM"
    a.proc.wait(30)
    start_core()
    record = client.wait(sid, timeout=60)
    assert record.state == "succeeded" and record.attempt == 2
    for name in ("signal", "stopped_with", "requeued_because"):
        assert record.get(name) is None, (name, record.get(name))
    assert record.exit_code == 0
    lost, ok = record.get("attempts")
    assert (lost["attempt"], lost["state"], ok["attempt"], ok["state"]) == (
        1, "lost", 2, "succeeded")
    assert lost["signal"] == "SIGTERM" and lost["work_dir"]
    assert starts(logdir, sid) == 2
    no_overlap(logdir)


def test_an_adopted_program_is_cancelled_and_its_outputs_collected_by_the_survivor(
        start_core, client, logdir, tmp_path):
    a = start_core(SOAF_NODE="core-a")
    release = tmp_path / "release"
    done = hold(client, logdir, 0, until=str(release), output_files=["tick1.txt"])
    endless = hold(client, logdir, 0, until=str(tmp_path / "never"))
    wait_until(lambda: len(running_on(client, [done, endless], "core-a")) == 2, 30,
               message="both running on core-a")
    start_core(SOAF_NODE="core-b")
    a.kill()
    wait_until(lambda: all(client.status(s).get("recovered_as") == "adopt"
                           for s in (done, endless)), 30, message="core-b adopts both programs")
    release.write_text("go")
    client.cancel(endless)
    cancelled = client.wait(endless, timeout=30)
    assert cancelled.state == "cancelled" and cancelled.attempt == 1
    assert cancelled.get("stopped_with") in ("SIGTERM", "SIGKILL")
    record = client.wait(done, timeout=60)
    assert record.state == "succeeded" and record.get("recovered_as") == "adopt"
    (output,) = record.get("outputs")
    assert output["name"] == "tick1.txt" and len(output["sha256"]) == 64
    for sid in (done, endless):
        assert starts(logdir, sid) == 1 and len(afters(logdir, sid)) == 1
    no_overlap(logdir)
