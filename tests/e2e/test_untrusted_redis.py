"""Redis is not a trusted party: someone who can write to it without the secret may delay
or delete work, but never make a core signal a process that is not its own, crash it,
stage a local file it was not given, or write a second final state."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import soaf
from soaf import ServiceParamTemplate
from soaf.process.identity import ProcIdentity
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.signed import sign_control
from soaf.protocol.state import FINAL_VALUES
from tests.conftest import SECRET, wait_until


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    path = tmp_path / "hold-log"
    path.mkdir()
    return path


@pytest.fixture
def victim():
    """A process in a group of its own that no core started."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def hold_template(logdir: Path, seconds: float, **kw) -> ServiceParamTemplate:
    args = {"seconds": seconds, "logdir": str(logdir), "code": 0, "until": ""}
    return ServiceParamTemplate("hold", args=args, watch_interval=0.2, **kw)


def test_forged_journal_never_signals_a_foreign_group(start_core, redis_server, prefix, client,
                                                      logdir, victim):
    """A record whose journal names the core's own pid (alive, right start time) with
    another group id: the core takes the entry over from a consumer without heartbeat and
    stops nothing of that group."""
    r = redis_server.client()
    keys = Keys(prefix)
    template = hold_template(logdir, 0.2, retries=1)
    sid = template.service_id
    r.xgroup_create(keys.submit, GROUP, id="0", mkstream=True)
    entry = r.xadd(keys.submit, {"payload": soaf.dumps(template, SECRET), "id": sid}).decode()
    r.xreadgroup(GROUP, "ghost", {keys.submit: ">"}, count=1)  # pending for a dead consumer
    core = start_core()
    me = ProcIdentity.of(core.proc.pid)
    assert me is not None
    process = {**me.to_dict(), "pgid": victim.pid}
    journal = {"service_id": sid, "attempt": 1, "node": "ghost", "steps": ["built", "prepared", "running"],
               "process": process, "shimmed": True}
    r.hset(keys.service(sid), mapping={
        "service_id": json.dumps(sid), "service": '"hold"', "state": '"running"',
        "attempt": 1, "seq": 3, "entry": json.dumps(entry), "node": '"ghost"',
        "journal": json.dumps(journal)})
    record = client.wait(sid, timeout=60)
    assert record.final and record.attempt == 2, record
    assert victim.poll() is None, "the core signalled a process group it never started"
    assert core.alive()


def test_edited_producer_record_never_stages_a_local_file(start_core, redis_server, prefix,
                                                          client, tmp_path):
    """A succeeded producer's record edited to say its output is a local file elsewhere:
    the consumer fails in preparing; nothing outside the work root is staged."""
    private = tmp_path / "private.txt"
    private.write_text("not for services\n")
    start_core()
    producer = client.submit(ServiceParamTemplate("shell", args={"script": "echo hi > data.txt"},
                                                  output_files=["data.txt"]))
    assert client.wait(producer, timeout=60).ok
    r = redis_server.client()
    for url in (str(private), f"file://{private}"):
        r.hset(Keys(prefix).service(producer), mapping={
            "host": '"elsewhere"', "work_dir": json.dumps(str(tmp_path / "not-here")),
            "outputs": json.dumps([{"name": "data.txt", "size": 3, "url": url}])})
        consumer = client.submit(ServiceParamTemplate(
            "shell", args={"script": "cat data.txt"},
            input_files=[soaf.output_ref(producer, "data.txt")]))
        record = client.wait(consumer, timeout=60)
        assert record.state == "failed", record
        assert "outside the work root" in record.error
        assert not record.inputs


def test_tampered_attempt_beside_a_replayed_payload_fails_that_service_only(
        start_core, redis_server, prefix, client, logdir):
    """``attempt: "x"`` on a record whose payload is replayed: the service fails as
    tampered, the core lives on (and after a restart), other services succeed."""
    core = start_core()
    r = redis_server.client()
    keys = Keys(prefix)
    template = hold_template(logdir, 0.1)
    sid = template.service_id
    r.hset(keys.service(sid), mapping={"state": '"queued"', "attempt": "x", "seq": "1"})
    r.hset(keys.cancels, "nobody", "1")
    r.xadd(keys.submit, {"payload": soaf.dumps(template, SECRET), "id": sid})
    record = client.wait(sid, timeout=30)
    assert record.state == "failed" and record.error == "record tampered: attempt is not a number"
    assert core.alive()
    core.stop()
    core = start_core()
    assert client.wait(client.submit(hold_template(logdir, 0.1)), timeout=30).ok
    assert core.alive()


FIELDS = ["attempt", "seq", "state", "entry", "lost_count", "service_id", "journal", "node"]
JUNK = st.one_of(st.sampled_from(["x", "-1", "1.5", "null", "{}", "[]", '"x"', "1e400", ""]),
                 st.binary(max_size=8), st.integers(-3, 10 ** 20).map(str))


@pytest.mark.timeout(600)  # 10 examples, each with services that must finish
@settings(max_examples=10, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutation_fuzz_never_stops_a_core(start_core, redis_server, prefix, client, logdir,
                                          data):
    """Fields of the keys a core reads are corrupted (type and value) while services run:
    the core never exits, its heartbeat keeps beating, and untouched services succeed."""
    global _core
    r = redis_server.client()
    keys = Keys(prefix)
    if _core.get(prefix) is None or not _core[prefix].alive():
        assert not _core.get(prefix), "the core exited"
        _core[prefix] = start_core()
    core = _core[prefix]
    victims = [client.submit(hold_template(logdir, 0.5)) for _ in range(2)]
    healthy = [client.submit(hold_template(logdir, 0.3)) for _ in range(2)]
    for sid in victims:
        for name in data.draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
            r.hset(keys.service(sid), name, data.draw(JUNK))
    kind = data.draw(st.sampled_from(["none", "cancels", "control", "node", "events"]))
    if kind == "cancels":
        r.delete(keys.cancels)
        r.set(keys.cancels, data.draw(JUNK))
    elif kind == "control":
        r.xadd(keys.control, {"type": data.draw(JUNK), "id": data.draw(JUNK),
                              "node": data.draw(st.sampled_from([b"", b"core-a"]))})
    elif kind == "node":
        r.set(keys.node("core-z"), data.draw(JUNK))
        r.sadd(keys.nodes, "core-z")
    elif kind == "events":
        r.delete(keys.events(victims[0]))
        r.set(keys.events(victims[0]), "junk")
    for sid in healthy:
        assert client.wait(sid, timeout=30).ok
    # A tampered service may be delayed or lost (a record edited to say it ran is not run
    # again); what matters is that nothing else is.
    r.delete(keys.cancels)
    beat = r.pttl(keys.node("core-a"))
    assert beat > 0, "the heartbeat stopped"
    assert core.alive(), core.log()[-3000:]


_core: dict[str, object] = {}


def test_deleted_heartbeat_of_a_live_core_causes_no_takeover(start_core, redis_server, prefix,
                                                              client, logdir):
    """core-a's heartbeat key is deleted while it runs a service: core-b does not take the
    service over, core-a renews its key, and the service gets exactly one final state."""
    a = start_core(SOAF_NODE="core-a")
    r = redis_server.client()
    sid = client.submit(hold_template(logdir, 10))
    wait_until(lambda: client.status(sid).state == "running", 30, message="running")
    start_core(SOAF_NODE="core-b")
    time.sleep(3.5)  # core-b has been connected for a whole TTL: it may take over now
    lapse = time.monotonic() + 1.5  # shorter than the TTL (3 s)
    while time.monotonic() < lapse:
        r.delete(Keys(prefix).node("core-a"))
        time.sleep(0.02)
    record = client.wait(sid, timeout=60)
    assert record.state == "succeeded" and record.attempt == 1 and record.node == "core-a"
    finals = [e for e in client.events(sid, follow=False) if e.get("state") in FINAL_VALUES]
    assert len(finals) == 1, finals
    assert a.alive() and r.exists(Keys(prefix).node("core-a"))


def test_a_takeover_of_a_live_core_fences_before_it_stops_the_program(start_core, redis_server,
                                                                     prefix, client, logdir):
    """core-a is alive, but its heartbeat key is deleted over and over for longer than the
    TTL: core-b takes its service over and stops its program (same host). core-a sees the
    program die and writes the old attempt's end at once; that write must meet the newer
    attempt (the takeover fences in Redis first, then stops), so the service is run again
    and succeeds, rather than ending "failed: killed by SIGTERM"."""
    start_core(SOAF_NODE="core-a")
    r = redis_server.client()
    key = Keys(prefix).node("core-a")
    done = logdir / "done"  # the program runs until this file exists
    sid = client.submit(ServiceParamTemplate("hold", args={
        "seconds": 0, "logdir": str(logdir), "code": 0, "until": str(done)}, watch_interval=0.2))
    wait_until(lambda: client.status(sid).state == "running", 30, message="running")
    start_core(SOAF_NODE="core-b")
    time.sleep(3.5)  # core-b has been connected for a whole TTL: it may take over now
    deadline = time.monotonic() + 30
    while (now := client.status(sid)).attempt < 2 and not now.final:
        assert time.monotonic() < deadline, "core-b to take the service over"
        for _ in range(20):  # core-a writes its key again at each beat
            r.delete(key)
            time.sleep(0.005)
    assert not client.status(sid).final, client.status(sid)  # not ended by the stopped program
    wait_until(lambda: client.status(sid).state == "running", 30, message="attempt 2 to run")
    done.touch()
    record = client.wait(sid, timeout=60)
    assert (record.state, record.attempt, record.node) == ("succeeded", 2, "core-b"), record
    assert [a.get("state") for a in record.get("attempts")] == ["lost", "succeeded"]
    finals = [e for e in client.events(sid, follow=False) if e.get("state") in FINAL_VALUES]
    assert len(finals) == 1, finals


def test_forged_heartbeat_token_stops_no_core(start_core, redis_server, prefix, client, logdir):
    """A heartbeat value with another token, naming a dead process on this host, a live
    process of this host that is no core, or a core on another host whose value stays
    still: the core writes its own heartbeat back and goes on running its services."""
    r = redis_server.client()
    key = Keys(prefix).node("core-a")
    core = start_core()
    me = json.loads(r.get(key))
    sid = client.submit(hold_template(logdir, 4))
    wait_until(lambda: client.status(sid).state == "running", 30, message="running")
    gone = subprocess.Popen(["true"])
    gone.wait()
    r.set(key, json.dumps({**me, "pid": gone.pid, "token": "forged"}), px=60_000)
    wait_until(lambda: json.loads(r.get(key))["token"] == me["token"], 10,
               message="the core to write its heartbeat back")
    wait_until(lambda: "stale or forged" in core.log(), 5, message="the warning")
    other = subprocess.Popen(["sleep", "60"])  # alive, with its real start time, no core
    try:
        start = ProcIdentity.of(other.pid).start_time
        r.set(key, json.dumps({**me, "pid": other.pid, "pid_start": start, "token": "forged"}),
              px=60_000)
        wait_until(lambda: json.loads(r.get(key))["token"] == me["token"], 10,
                   message="the core to write its heartbeat back over a live non-core")
    finally:
        other.kill()
        other.wait()
    r.set(key, json.dumps({**me, "host": "elsewhere", "token": "forged"}), px=60_000)
    wait_until(lambda: json.loads(r.get(key))["token"] == me["token"], 15,
               message="the core to write its heartbeat back after a still TTL")
    r.delete(key)
    wait_until(lambda: r.get(key) is not None, 10, message="the key written again")
    # The warning follows the write that brought the key back.
    wait_until(lambda: "was missing; written again" in core.log(), 5, message="the warning")
    assert client.wait(sid, timeout=60).state == "succeeded"
    assert core.alive() and "has taken node name" not in core.log()


def test_forged_cancels_cancel_nothing(start_core, redis_server, prefix, client, logdir):
    """Cancels written straight into Redis (unsigned, signed with another key, or a real
    signature moved to another service) stop no running service and no queued one; a
    real ``Client.cancel`` still cancels both."""
    r = redis_server.client()
    keys = Keys(prefix)
    other = sign_control("cancel", "another-service", SECRET)
    forgeries = ["", "1712345678.5", sign_control("cancel", "x", "not-the-secret"), other]
    # Queued while no core runs: forged entries in the cancels hash, one signed for real.
    queued = [client.submit(hold_template(logdir, 0.2)) for _ in forgeries]
    real = client.submit(hold_template(logdir, 0.2))
    for sid, forged in zip(queued, forgeries):
        r.hset(keys.cancels, sid, forged.replace("x", sid) if "not-the" in forged else forged)
    r.hset(keys.cancels, real, sign_control("cancel", real, SECRET))
    core = start_core()
    assert [client.wait(s, timeout=60).state for s in queued] == ["succeeded"] * len(queued)
    assert client.wait(real, timeout=60).state == "cancelled"
    # Running: forged control messages and hash entries.
    sid = client.submit(hold_template(logdir, 6))
    wait_until(lambda: client.status(sid).state == "running", 30, message="running")
    for forged in forgeries:
        r.hset(keys.cancels, sid, forged)
        r.xadd(keys.control, {"type": "cancel", "id": sid, "sig": forged})
    r.xadd(keys.control, {"type": "reload", "sig": sign_control("reload", "", "wrong")})
    r.xadd(keys.control, {"type": "self-destruct"})
    record = client.wait(sid, timeout=60)
    assert record.state == "succeeded", record
    log = core.log()
    assert f"ignored a cancel for '{sid}' in the control stream" in log
    assert "ignored a reload for '' in the control stream: bad signature" in log
    assert "unknown type 'self-destruct'" in log
    # A real cancel, of a running service.
    sid = client.submit(hold_template(logdir, 30))
    wait_until(lambda: client.status(sid).state == "running", 30, message="running")
    client.cancel(sid)
    assert client.wait(sid, timeout=60).state == "cancelled"
    assert core.alive()


def test_unverified_rejections_live_an_hour(start_core, redis_server, prefix, client):
    """A record made `rejected` for an entry whose signature was never checked (its id read
    in clear) lives an hour, not the record TTL; a finished service's record keeps its
    TTL when garbage is sent under its id."""
    r = redis_server.client()
    keys = Keys(prefix)
    start_core()
    done = client.submit(ServiceParamTemplate("true"))
    assert client.wait(done, timeout=30).state == "succeeded"
    r.xadd(keys.submit, {"payload": b"garbage", "id": "forged-id"})
    r.xadd(keys.submit, {"payload": b"garbage", "id": done})
    wait_until(lambda: r.hget(keys.service("forged-id"), "state") == b'"rejected"', 30,
               message="rejected")
    wait_until(lambda: 0 < r.ttl(keys.service("forged-id")) <= 3600, 10, message="short TTL")
    wait_until(lambda: r.xlen(keys.submit) == 0, 10, message="entries done")
    assert r.ttl(keys.service(done)) > 24 * 3600
    assert client.status(done).state == "succeeded"
