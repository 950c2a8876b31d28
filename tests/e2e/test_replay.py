"""A captured signed payload replayed after its record is gone: refused once it is older
than SOAF_MAX_PAYLOAD_AGE; fresh payloads, and old ones whose record waits, still run."""

from __future__ import annotations

import time

import soaf
from soaf import ServiceParamTemplate
from soaf.protocol.keys import GROUP, Keys
from soaf.protocol.scripts import SUBMIT
from soaf.protocol.state import EVENTS_MAXLEN
from tests.conftest import SECRET

MAX_AGE = 2.0


def steps() -> ServiceParamTemplate:
    return ServiceParamTemplate("steps", args={"n": 1}, watch_interval=0.05)


def test_replayed_payload_is_refused_once_its_record_is_gone(start_core, redis_server, prefix,
                                                             client):
    r = redis_server.client()
    keys = Keys(prefix)
    waiting = steps()  # signed long ago, queued with a record, before any core is up
    old = soaf.dumps(waiting, SECRET)
    time.sleep(MAX_AGE + 0.5)
    sid = waiting.service_id
    SUBMIT.run(r, [keys.service(sid), keys.events(sid), keys.services, keys.queue("steps", 0),
                   keys.queues, keys.offered, keys.ready, keys.new_queues],
               [sid, "steps", time.time(), old, keys.notify, EVENTS_MAXLEN, 0, "steps:0", 0,
                GROUP])
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
