"""The recovery building blocks against a real Redis and real processes: takeover script,
lost/failed script, node-name guard, process identity, the exit-status shim, journals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from soaf.core.heartbeat import Identity, claim_node
from soaf.core.liveness import Liveness, missing_heartbeats, take_over
from soaf.errors import NodeInUse, ProgramError
from soaf.process import shim
from soaf.process.coremark import mark_core
from soaf.process.identity import ProcIdentity, find_by_marker, stop_group
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.scripts import RECLAIM_LUA
from soaf.protocol.state import EVENTS_MAXLEN, FINAL_VALUES
from soaf.run.journal import MAX_JOURNAL_BYTES, RunJournal, load, local_journals
from tests.conftest import stream_events


@pytest.fixture
def r(redis_server):
    client = redis_server.client()
    yield client
    client.close()


def deliver(r, keys: Keys, consumer: str, n: int) -> list[str]:
    r.xgroup_create(keys.submit, GROUP, id="0", mkstream=True)
    ids = [r.xadd(keys.submit, {"id": f"s{i}"}).decode() for i in range(n)]
    r.xreadgroup(GROUP, consumer, {keys.submit: ">"}, count=n)
    return ids


def beat(r, keys: Keys, node: str, token: str | None = None) -> None:
    """Write ``node``'s heartbeat key as its core does (the scripts read its token)."""
    r.set(keys.node(node), json.dumps({"pid": 1, "token": token or f"t-{node}"}), px=60_000)


def test_racing_survivors_take_each_entry_exactly_once(r, prefix):
    keys = Keys(prefix)
    ids = deliver(r, keys, "dead", 60)
    for i in range(4):
        beat(r, keys, f"s{i}")
    claimed: dict[str, list[str]] = {}
    barrier = threading.Barrier(4)

    def survivor(name: str) -> None:
        client = r.__class__(connection_pool=r.connection_pool)
        barrier.wait()
        got: list[str] = []
        while moved := take_over(client, keys, keys.submit, "dead", name, f"t-{name}", 7):
            got += [entry_id for entry_id, _ in moved]
        claimed[name] = got

    threads = [threading.Thread(target=survivor, args=(f"s{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    everything = [e for got in claimed.values() for e in got]
    assert sorted(everything) == sorted(ids)  # each exactly once
    pending = {c["name"].decode(): c["pending"] for c in r.xinfo_consumers(keys.submit, GROUP)}
    assert "dead" not in pending  # emptied, then deleted
    assert sum(pending.values()) == 60
    assert {name: len(got) for name, got in claimed.items()} == {
        name: pending.get(name, 0) for name in claimed}


def test_a_live_node_is_never_taken_over(r, prefix):
    keys = Keys(prefix)
    ids = deliver(r, keys, "alive", 3)
    beat(r, keys, "thief")
    beat(r, keys, "heir")
    r.set(keys.node("alive"), "{}", px=60_000)
    assert take_over(r, keys, keys.submit, "alive", "thief", "t-thief", 10) == []
    assert r.xpending(keys.submit, GROUP)["consumers"] == [{"name": b"alive", "pending": 3}]
    r.delete(keys.node("alive"))
    moved = take_over(r, keys, keys.submit, "alive", "heir", "t-heir", 10)
    assert [entry_id for entry_id, _ in moved] == ids
    assert moved[0][1] == {b"id": b"s0"}


def test_a_core_judges_others_dead_only_where_it_sees_its_own_heartbeat(r, prefix):
    """A server without the taker's own heartbeat (a stale master after a flapping
    failover, or a replica promoted without the last writes) is not where its beats go:
    there every live core looks dead, and it takes nothing over."""
    keys = Keys(prefix)
    ids = deliver(r, keys, "other", 2)
    assert missing_heartbeats(r, keys, ["other", "third"], "heir", "t-heir") is None
    assert take_over(r, keys, keys.submit, "other", "heir", "t-heir", 10) == []
    beat(r, keys, "heir", "a-token-of-another-process")  # the name, but not this core
    assert missing_heartbeats(r, keys, ["other"], "heir", "t-heir") is None
    assert take_over(r, keys, keys.submit, "other", "heir", "t-heir", 10) == []
    r.set(keys.node("heir"), "not json", px=60_000)
    assert take_over(r, keys, keys.submit, "other", "heir", "t-heir", 10) == []
    assert r.xpending(keys.submit, GROUP)["consumers"] == [{"name": b"other", "pending": 2}]
    beat(r, keys, "heir")
    beat(r, keys, "third")
    assert missing_heartbeats(r, keys, ["other", "third"], "heir", "t-heir") == {"other"}
    moved = take_over(r, keys, keys.submit, "other", "heir", "t-heir", 10)
    assert [entry_id for entry_id, _ in moved] == ids


def test_a_missing_heartbeat_counts_a_whole_ttl_seen_beside_the_own_one(r, prefix):
    keys = Keys(prefix)
    liveness = Liveness(r, keys, "heir", "t-heir", ttl=0.3)
    beat(r, keys, "heir")
    beat(r, keys, "alive")
    assert liveness.dead(["alive", "gone", "heir"]) == []  # "gone": missing from now on
    assert liveness.alive == {"alive"}
    time.sleep(0.35)
    assert liveness.dead(["alive", "gone", "heir"]) == ["gone"]
    # The own heartbeat vanishes (data lost, or this is not the server the beats reach):
    # nobody is judged, and the count starts over once it is back.
    r.delete(keys.node("heir"))
    assert liveness.dead(["alive", "gone"]) == []
    beat(r, keys, "heir")
    assert liveness.dead(["alive", "gone"]) == []
    time.sleep(0.35)
    assert liveness.dead(["alive", "gone"]) == ["gone"]
    r.delete(keys.node("alive"))  # a key deleted once is no death
    assert liveness.dead(["alive", "gone"]) == ["gone"]
    beat(r, keys, "alive")
    assert liveness.dead(["alive", "gone"]) == ["gone"] and liveness.alive == {"alive"}


def _record(r, keys: Keys, sid: str, entry: str, state: str, attempt: int) -> None:
    r.hset(keys.service(sid), mapping={
        "service_id": json.dumps(sid), "state": json.dumps(state), "attempt": attempt,
        "seq": 4, "entry": json.dumps(entry)})


def _reclaim(r, keys: Keys, sid: str, entry: str, max_lost: int) -> list:
    return r.eval(RECLAIM_LUA, 4, keys.service(sid), keys.events(sid), keys.services,
                  keys.cancels, sid, "hold", time.time(), "heir", entry, keys.notify,
                  EVENTS_MAXLEN, '"1-x"', ",".join(FINAL_VALUES), "", max_lost,
                  "its core (dead) died", "dead")


def test_lost_attempts_rerun_until_more_than_max_lost_are_lost(r, prefix):
    keys = Keys(prefix)
    _record(r, keys, "svc", "1-1", "running", 1)
    r.hset(keys.service("svc"), mapping={"signal": '"SIGKILL"', "pid": "42",
                                         "work_dir": '"/w/svc"'})
    verdict, state, attempt, seq, attempts, building = _reclaim(r, keys, "svc", "1-1", 1)
    assert (verdict, state, attempt, seq, building) == (b"run", b"building", 2, 6, b"1")
    (lost,) = json.loads(attempts)  # the lost attempt, with what it left on the record
    assert (lost["attempt"], lost["state"], lost["node"], lost["signal"], lost["pid"]) == (
        1, "lost", "dead", "SIGKILL", 42)
    # Lost again before its run wrote its ``building`` event (the run writes it).
    verdict, state, attempt, _, _ = _reclaim(r, keys, "svc", "1-1", 1)
    assert (verdict, attempt) == (b"failed", 2)
    events = stream_events(r, keys.events("svc"))
    assert [(e["state"], e["attempt"], e["seq"]) for e in events] == [
        ("lost", 1, 5), ("lost", 2, 6), ("failed", 2, 7)]
    assert events[-1]["error"].startswith("lost 2 times: the cores running it kept dying")
    assert events[-1]["failure"] == "lost" and "core dead" in events[-1]["error"]
    assert events[0]["lost_in"] == "running" and events[0]["node"] == "dead"
    assert [a["attempt"] for a in json.loads(r.hget(keys.service("svc"), "attempts"))] == [1, 2]
    # Final now: a further redelivery changes nothing.
    assert _reclaim(r, keys, "svc", "1-1", 5)[0] == b"final"
    assert len(r.xrange(keys.events("svc"))) == 3


def test_a_tampered_record_is_reclaimed_without_a_script_error(r, prefix):
    keys = Keys(prefix)
    _record(r, keys, "bad", "1-1", "running", 1)
    r.hset(keys.service("bad"), mapping={"attempts": "not json", "lost_count": "1",
                                         "pid": "{"})
    assert _reclaim(r, keys, "bad", "1-1", 3)[:3] == [b"run", b"building", 2]


def test_reclaim_of_a_queued_or_duplicate_entry_marks_nothing_lost(r, prefix):
    keys = Keys(prefix)
    _record(r, keys, "q", "1-1", "queued", 0)
    assert _reclaim(r, keys, "q", "1-1", 1)[:3] == [b"run", b"building", 1]
    _record(r, keys, "d", "1-1", "running", 1)
    assert _reclaim(r, keys, "d", "2-2", 1)[0] == b"duplicate"
    for sid in ("q", "d"):
        states = [e["state"] for e in stream_events(r, keys.events(sid))]
        assert "lost" not in states


# -- the node-name guard ----------------------------------------------------------------------


def _heartbeat(pid: int, start: int) -> str:
    me = Identity()
    return json.dumps({"pid": pid, "pid_start": start, "host": me.host, "boot_id": me.boot_id,
                       "token": "other"})


def test_node_name_of_a_dead_core_on_this_host_is_taken_at_once(r, prefix):
    child = subprocess.Popen(["true"])
    child.wait()  # a pid that existed and is gone
    key = Keys(prefix).node("n1")
    r.set(key, _heartbeat(child.pid, 12345), px=60_000)
    started = time.monotonic()
    claim_node(r, key, "n1", '{"token": "mine"}', 60.0)
    assert time.monotonic() - started < 5  # not the 60 s TTL
    assert r.get(key) == b'{"token": "mine"}'


def test_node_name_of_a_live_core_on_this_host_is_refused(r, prefix):
    mark = mark_core()  # this process now holds a core's mark, as a core does
    assert mark is not None
    key = Keys(prefix).node("n2")
    me = ProcIdentity.of(os.getpid())
    assert me is not None
    r.set(key, _heartbeat(os.getpid(), me.start_time), px=60_000)
    with pytest.raises(NodeInUse, match="in use by a running core"):
        claim_node(r, key, "n2", "{}", 60.0)
    # Same pid, another start time: a recycled pid, not that core.
    r.set(key, _heartbeat(os.getpid(), me.start_time + 1), px=60_000)
    claim_node(r, key, "n2", '{"token": "mine"}', 60.0)
    mark.close()


def test_a_heartbeat_naming_a_live_process_that_is_no_core_is_taken_at_once(r, prefix):
    """Pid and start time of a live process of this host, copied into a forged heartbeat:
    that process holds no core's mark, so the name is free."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        found = ProcIdentity.of(other.pid)
        assert found is not None
        key = Keys(prefix).node("n3")
        r.set(key, _heartbeat(other.pid, found.start_time), px=60_000)
        claim_node(r, key, "n3", '{"token": "mine"}', 60.0)
        assert r.get(key) == b'{"token": "mine"}'
    finally:
        other.kill()
        other.wait()


# -- process identity --------------------------------------------------------------------------


def test_identity_needs_pid_and_start_time(tmp_path):
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        me = ProcIdentity.of(child.pid)
        assert me is not None and me.alive() and me.pgid == child.pid
        impostor = ProcIdentity(child.pid, me.start_time - 1, me.pgid, me.host, me.boot_id)
        assert not impostor.alive()
        assert stop_group(impostor, 1.0) is False  # never signalled
        assert child.poll() is None
        elsewhere = ProcIdentity(child.pid, me.start_time, me.pgid, "other-host", me.boot_id)
        assert not elsewhere.alive() and not elsewhere.local
        assert stop_group(me, 1.0) is True
        assert child.wait(5) == -signal.SIGTERM
        assert not me.alive()
    finally:
        child.kill()
        child.wait()


def test_stop_group_escalates_to_sigkill():
    child = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 30"], start_new_session=True)
    try:
        time.sleep(0.2)
        me = ProcIdentity.of(child.pid)
        assert me is not None
        assert stop_group(me, 0.3)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()


# -- the shim ----------------------------------------------------------------------------------


def _run_shimmed(tmp_path: Path, argv: list[str], sig: int | None = None) -> tuple[int, Path]:
    exit_file = tmp_path / "x.exit"
    wrapped, shimmed = shim.wrap(argv, cwd=tmp_path, env=dict(os.environ), exit_file=exit_file)
    assert shimmed
    proc = subprocess.Popen(wrapped, cwd=tmp_path, start_new_session=True)
    if sig is not None:
        time.sleep(0.3)
        os.killpg(proc.pid, sig)
    return proc.wait(10), exit_file


def test_shim_keeps_exit_code_and_signal(tmp_path):
    code, exit_file = _run_shimmed(tmp_path, ["sh", "-c", "exit 3"])
    assert code == 3 and shim.read_exit(exit_file) == 3
    code, exit_file = _run_shimmed(tmp_path, ["sleep", "30"], signal.SIGTERM)
    assert code == -signal.SIGTERM and shim.read_exit(exit_file) == -signal.SIGTERM
    # The program gets its grace period: the shim waits for it, then ends as it did.
    code, exit_file = _run_shimmed(
        tmp_path, ["sh", "-c", "trap 'sleep 0.3; exit 7' TERM; sleep 30 & wait"], signal.SIGTERM)
    assert code == 7 and shim.read_exit(exit_file) == 7


def test_shim_survives_its_parent_and_records_the_exit(tmp_path):
    """The core dies (here: a middle process killed with -9); the program ends later and
    its status is still found in the exit file, and the shim is found by its marker."""
    exit_file = tmp_path / "y.exit"
    wrapped, _ = shim.wrap(["sh", "-c", "sleep 0.5; exit 5"], cwd=tmp_path,
                           env=dict(os.environ), exit_file=exit_file)
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; p = subprocess.Popen(sys.argv[1:], "
        "start_new_session=True); print(p.pid, flush=True); time.sleep(30)"), *wrapped],
        stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    found = find_by_marker(str(exit_file))
    assert [f.pid for f in found] == [pid]
    deadline = time.monotonic() + 10
    while shim.read_exit(exit_file) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shim.read_exit(exit_file) == 5


def test_shim_checks_the_program_first(tmp_path):
    env = dict(os.environ)
    with pytest.raises(ProgramError, match=r"executable not found: \./nope"):
        shim.wrap(["./nope"], cwd=tmp_path, env=env, exit_file=tmp_path / "e")
    with pytest.raises(ProgramError, match="executable not found: no-such-cmd-xyz"):
        shim.wrap(["no-such-cmd-xyz"], cwd=tmp_path, env=env, exit_file=tmp_path / "e")
    (tmp_path / "plain").write_text("echo no shebang")
    (tmp_path / "plain").chmod(0o755)
    argv, shimmed = shim.wrap(["./plain"], cwd=tmp_path, env=env, exit_file=tmp_path / "e")
    assert (argv, shimmed) == (["./plain"], False)  # a direct spawn reports ENOEXEC
    (tmp_path / "noexec").write_text("#!/bin/sh\n")
    with pytest.raises(ProgramError, match="permission denied"):
        shim.wrap(["./noexec"], cwd=tmp_path, env=env, exit_file=tmp_path / "e")
    # What the head of a program says is remembered only while the file stays the same.
    (tmp_path / "plain").write_text("#!/bin/sh\necho now a script\n")
    assert shim.wrap(["./plain"], cwd=tmp_path, env=env, exit_file=tmp_path / "e")[1]
    (tmp_path / "plain").write_text("echo no shebang again")
    assert not shim.wrap(["./plain"], cwd=tmp_path, env=env, exit_file=tmp_path / "e")[1]
    (tmp_path / "plain").unlink()
    with pytest.raises(ProgramError, match=r"executable not found: \./plain"):
        shim.wrap(["./plain"], cwd=tmp_path, env=env, exit_file=tmp_path / "e")


# -- journals ----------------------------------------------------------------------------------


def test_journal_on_disk_and_removal(tmp_path):
    old = RunJournal(tmp_path, "n", "svc", 1, tmp_path / "w")
    assert "journal" in old.step("built")
    old.step("running", save=True, process={"pid": 1}, running_at=1.0)
    assert load(old.path).steps == ["built", "running"]
    new = RunJournal(tmp_path, "n", "svc", 2, tmp_path / "w")
    new.step("running", save=True)
    assert sorted(j.attempt for _, j in local_journals(tmp_path, "n")) == [1, 2]
    old.remove()  # one attempt's files only
    assert [j.attempt for _, j in local_journals(tmp_path, "n")] == [2]
    new.collected = True
    assert new.finish({"state": "succeeded"})["journal"]["steps"][-1] == "collected"
    assert load(new.path).final == {"state": "succeeded"}
    with open(new.path, "a") as f:  # a line torn by a crash: the last complete one counts
        f.write('{"service_id": "svc", "attem')
    assert load(new.path).final == {"state": "succeeded"}
    new.remove()
    assert not new.path.exists()


def test_a_cancels_key_of_the_wrong_type_reads_as_no_cancel(r, prefix):
    """A tampered cancels key must not make the claim of a healthy service raise (its
    entry would stay pending): it reads as no cancel (the first script to meet it drops it)."""
    from soaf.core.cancels import Verifier

    keys = Keys(prefix)
    r.set(keys.cancels, "junk")
    assert Verifier(["a-secret-of-twenty-chars"]).cancel_entries(r, keys, ["a", "b"]) == ["", ""]


def test_a_journal_noted_by_every_callback_stays_small_and_readable(tmp_path):
    """Each callback call appends two lines; past MAX_JOURNAL_BYTES the file is replaced
    by its last line, and a core that loads it still finds the call under way and the
    deaths in a row."""
    journal = RunJournal(tmp_path, "n", "svc", 1, tmp_path)
    journal.data.died_in = ["file_change_callback"]
    for _ in range(2000):
        journal.calling("before_watch_callback")
        journal.calling("before_watch_callback", returned=True)
    journal.calling("file_change_callback")
    assert journal.path.stat().st_size <= MAX_JOURNAL_BYTES + 4096
    found = load(journal.path)
    assert found is not None and found.in_call == "file_change_callback"
    assert found.died_in == ["file_change_callback"]  # another call's return keeps the row
    journal.calling("file_change_callback", returned=True)
    assert load(journal.path).died_in == []


def test_a_callback_call_appends_only_what_changed(tmp_path):
    """A call under way is one short line of changes after a whole journal (a trivial
    service makes eight of them); loading applies them in order, skips a torn one, and a
    later whole line (a step) supersedes them."""
    journal = RunJournal(tmp_path, "n", "svc", 1, tmp_path)
    journal.step("running", save=True, process={"pid": 1, "start_time": 5}, running_at=1.0)
    journal.data.died_in = ["after_watch_callback"]
    size = journal.path.stat().st_size
    journal.calling("after_watch_callback")
    assert journal.path.stat().st_size - size < 40  # not the whole journal again
    found = load(journal.path)
    assert found is not None and found.in_call == "after_watch_callback"
    assert found.steps == ["running"] and found.process == {"pid": 1, "start_time": 5}
    assert found.died_in == []  # the whole line before the change did not have it yet
    journal.calling("after_watch_callback", returned=True)
    with open(journal.path, "a") as f:  # a change torn by a crash
        f.write('{"in_call": "file_ch')
    found = load(journal.path)
    assert found is not None and found.in_call is None and found.died_in == []
    with open(journal.path, "a") as f:
        f.write("\n")
    journal.step("collected", save=True, final={"state": "succeeded"})
    found = load(journal.path)
    assert found is not None and found.steps == ["running", "collected"]
    assert found.died_in == []  # cleared by the return, kept by the whole line
    journal.remove()
    assert not journal.path.exists()


def test_a_journal_closed_under_a_writer_appends_to_the_new_file(tmp_path):
    """A compaction in one thread closes the file another thread is about to append to
    (a stuck plugin call and the thread that took the run over): the line goes to the
    new file, not into an error in plugin code."""
    journal = RunJournal(tmp_path, "n", "svc", 1, tmp_path)
    journal.step("running", save=True)
    assert journal._file is not None
    journal._file.close()  # what another thread's compaction leaves behind
    journal.calling("after_watch_callback")
    found = load(journal.path)
    assert found is not None and found.in_call == "after_watch_callback"
    journal.remove()
