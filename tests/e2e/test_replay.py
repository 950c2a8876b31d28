"""A captured signed payload replayed after its record is gone: refused once it is older
than SOAF_MAX_PAYLOAD_AGE; fresh payloads, and old ones whose record waits, still run."""

from __future__ import annotations

import time

import dill

import soaf
from soaf import ServiceParamTemplate
from soaf.protocol import codec
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.scripts import SUBMIT
from soaf.protocol.state import EVENTS_MAXLEN
from tests.conftest import SECRET, wait_until

MAX_AGE = 2.0


def steps() -> ServiceParamTemplate:
    return ServiceParamTemplate("steps", args={"n": 1}, watch_interval=0.05)


def _submit(r, keys: Keys, sid: str, payload: bytes) -> None:
    """What Client.submit does, with a payload made by hand."""
    SUBMIT.run(r, [keys.service(sid), keys.events(sid), keys.services, keys.queue("steps", 0),
                   keys.queues, keys.offered, keys.ready, keys.new_queues],
               [sid, "steps", time.time(), payload, keys.notify, EVENTS_MAXLEN, 0, "steps:0", 0,
                GROUP])


def test_replayed_payload_is_refused_once_its_record_is_gone(start_core, redis_server, prefix,
                                                             client):
    r = redis_server.client()
    keys = Keys(prefix)
    waiting = steps()  # signed long ago, queued with a record, before any core is up
    old = soaf.dumps(waiting, SECRET)
    time.sleep(MAX_AGE + 0.5)
    sid = waiting.service_id
    _submit(r, keys, sid, old)
    start_core(SOAF_MAX_PAYLOAD_AGE=str(MAX_AGE))
    assert client.wait(sid, timeout=60).state == "succeeded"

    fresh = steps()
    fields = {"payload": soaf.dumps(fresh, SECRET), "id": fresh.service_id}
    r.xadd(keys.submit, fields)  # a fresh payload without a record (plain XADD) runs
    assert client.wait(fresh.service_id, timeout=60).state == "succeeded"

    r.delete(keys.service(fresh.service_id), keys.events(fresh.service_id))
    r.xadd(keys.submit, fields)  # replayed while still young: runs again
    assert client.wait(fresh.service_id, timeout=60).state == "succeeded"

    time.sleep(MAX_AGE + 0.5)
    r.delete(keys.service(fresh.service_id), keys.events(fresh.service_id))
    r.xadd(keys.submit, fields)  # the same capture, now too old
    record = client.wait(fresh.service_id, timeout=60)
    assert record.state == "rejected", record
    assert "replay" in (record.error or ""), record.error
    assert record.attempt == 0
    assert r.xlen(keys.submit) == 0  # forwarded to its queue,
    assert r.xlen(keys.queue("steps", 0)) == 0  # and there acknowledged and gone


def test_a_capture_pushed_again_later_is_refused_whatever_its_record_says(start_core,
                                                                          redis_server, prefix,
                                                                          client):
    """Redis stamps each entry with the time it was added: a payload signed long before
    its entry was added is a replay, even while its record (forged or reset) says queued."""
    r = redis_server.client()
    keys = Keys(prefix)
    start_core(SOAF_MAX_SUBMIT_DELAY="1")
    fresh = steps()
    fields = {"payload": soaf.dumps(fresh, SECRET), "id": fresh.service_id}
    r.xadd(keys.submit, fields)
    assert client.wait(fresh.service_id, timeout=60).state == "succeeded"
    time.sleep(1.5)
    r.hset(keys.service(fresh.service_id), mapping={"state": '"queued"', "attempt": "0"})
    queue = keys.queue("steps", 0)  # the same capture, into its queue, its record reset
    r.xadd(queue, {**fields, "service": "steps", "priority": "0"})
    r.sadd(keys.ready, "steps:0")
    wait_until(lambda: r.xlen(queue) == 0 and not r.xpending(queue, GROUP)["pending"],
               timeout=30)
    record = client.status(fresh.service_id)
    assert record.state == "queued" and record.attempt == 0, record  # never ran again
    r.delete(keys.service(fresh.service_id), keys.events(fresh.service_id))
    r.xadd(keys.submit, fields)  # and into the old submit stream, with its record deleted
    record = client.wait(fresh.service_id, timeout=60)
    assert record.state == "rejected", record
    assert "after its payload was signed" in (record.error or ""), record.error
    assert "SOAF_MAX_SUBMIT_DELAY" in (record.error or "")
    assert record.attempt == 0


def test_a_payload_without_signing_time_runs_only_with_its_record(start_core, redis_server,
                                                                  prefix, client):
    """Payloads of older clients carry no ``signed_at``: with their record (Client.submit)
    they run; pushed with no record, as a replay would be, they are refused."""
    r = redis_server.client()
    keys = Keys(prefix)
    start_core()
    old = steps()
    payload = codec.sign(dill.dumps(old), SECRET)  # signed as an older client did
    sid = old.service_id
    _submit(r, keys, sid, payload)
    assert client.wait(sid, timeout=60).state == "succeeded"
    r.delete(keys.service(sid), keys.events(sid))
    r.xadd(keys.submit, {"payload": payload, "id": sid})
    record = client.wait(sid, timeout=60)
    assert record.state == "rejected", record
    assert "with no signing time" in (record.error or ""), record.error


def test_an_entry_a_core_puts_back_counts_from_then(start_core, redis_server, prefix, client):
    """A core too small for a service puts its entry back for a larger one; the new entry
    carries the core's signed requeue, so the larger core runs it although its payload
    was signed longer ago than the max submit delay."""
    r = redis_server.client()
    keys = Keys(prefix)
    start_core(args=["--cpus", "4", "--max-services", "1"], SOAF_NODE="big",
               SOAF_MAX_SUBMIT_DELAY="1")
    busy = client.submit(ServiceParamTemplate("crunch", args={"seconds": 4}))
    wait_until(lambda: client.status(busy).state == "running", timeout=30)  # big reads no more
    sid = client.submit(ServiceParamTemplate("crunch", cpus=2, args={"seconds": 0}))
    start_core(args=["--cpus", "1"], SOAF_NODE="small", SOAF_MAX_SUBMIT_DELAY="1")
    queue = keys.queue("crunch", 0)
    wait_until(lambda: any(b"requeue" in fields for _, fields in r.xrange(queue)), timeout=30)
    record = client.wait(sid, timeout=60)  # big takes it once busy ends, >1 s after signing
    assert record.state == "succeeded", record
    assert record.node == "big"
    assert record.get("running_at") - record.get("submitted_at") > 1
