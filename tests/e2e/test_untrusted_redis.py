"""Redis is not a trusted party: someone who can write to it without the secret may delay
or delete work, but never make a core signal a process that is not its own, crash it,
stage a local file it was not given, or write a second final state."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import soaf
from soaf import ServiceParamTemplate
from soaf.process.identity import ProcIdentity
from soaf.protocol.keys import GROUP, Keys
from tests.conftest import SECRET


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
            "host": '"elsewhere"',
            "outputs": json.dumps([{"name": "data.txt", "size": 3, "url": url}])})
        consumer = client.submit(ServiceParamTemplate(
            "shell", args={"script": "cat data.txt"},
            input_files=[soaf.output_ref(producer, "data.txt")]))
        record = client.wait(consumer, timeout=60)
        assert record.state == "failed", record
        assert "outside the work root" in record.error
        assert not record.inputs
