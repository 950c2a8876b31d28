"""The signed payload kept beside each record, and resubmitting from it, with both clients."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import redis

import soaf
from soaf import ServiceParamTemplate
from soaf.errors import ClientError, SignatureError
from tests.blocking import flavours
from tests.conftest import SECRET


@dataclass
class Tagged(ServiceParamTemplate):
    """A subclass from a test module: its extra field must come back on a resubmit."""

    color: str = "blue"


@pytest.fixture(params=["sync", "async"])
def client(request, redis_server, prefix):
    c = flavours()[request.param](redis_server.url, secret=SECRET, prefix=prefix)
    yield c
    c.close()


def test_the_payload_is_kept_with_the_record_and_ages_with_it(start_core, client, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    sid = client.submit(ServiceParamTemplate("steps", args={"n": 1, "delay": 0.01}))
    kept = r.get(client.keys.payload(sid))
    assert kept is not None and soaf.loads(kept, [SECRET]).service_id == sid
    assert r.ttl(client.keys.payload(sid)) == -1  # no TTL while it is not final
    start_core(SOAF_RECORD_TTL="600")
    client.wait(sid, timeout=30)
    assert 0 < r.ttl(client.keys.payload(sid)) <= 600
    assert r.ttl(client.keys.service(sid)) > 0


def test_resubmit_runs_the_same_template_under_a_new_id(start_core, client):
    start_core()
    first = client.submit(Tagged("steps", args={"n": 1, "delay": 0.01}, color="green"))
    client.wait(first, timeout=30)
    second = client.resubmit(first)
    assert second != first
    record = client.wait(second, timeout=30)
    assert record.state == "succeeded"
    assert record.fields["extra_before"] == "green"  # the handler saw the subclass's field


def test_resubmit_needs_a_kept_and_genuine_payload(client, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    t = ServiceParamTemplate("steps")
    r.xadd(client.keys.submit, {"payload": soaf.dumps(t, SECRET), "id": t.service_id})
    with pytest.raises(ClientError, match="no payload is kept"):
        client.resubmit(t.service_id)
    forged = ServiceParamTemplate("steps")
    r.set(client.keys.payload(forged.service_id), soaf.dumps(forged, "another key, not ours"))
    with pytest.raises(SignatureError):
        client.resubmit(forged.service_id)


def test_soaf_resubmit_runs_a_service_again_under_a_new_id(start_core, core_env, redis_server,
                                                          prefix):
    """The command line: ``soaf resubmit ID --wait`` prints the old and the new id, the
    new service runs the same template, and an id with no kept payload exits 1."""
    from tests.e2e.test_cli import soaf as run

    plain = soaf.Client(redis_server.url, secret=SECRET, prefix=prefix)
    start_core()
    sid = plain.submit(ServiceParamTemplate("steps", args={"n": 1, "delay": 0.01}))
    assert plain.wait(sid, timeout=30).ok
    out = run(core_env, "resubmit", sid, "--wait")
    assert out.returncode == 0, out.stderr
    old, new = out.stdout.splitlines()[0].split()
    assert old == sid and new != sid
    assert f"{new}: succeeded" in out.stdout
    record = plain.status(new)
    assert record.service == "steps" and record.ok
    missing = run(core_env, "resubmit", "no-such-id")
    assert missing.returncode == 1 and "no payload is kept" in missing.stderr
    plain.close()
