"""Bad input against a real core: each gets its specific error, recorded where the
submitter can see it (the service's record when its id can be read, else the dead-letter
stream), and the core then runs a good submission normally.

One core serves the whole parametrized table (starting one per case would dominate the
run time); every case ends by running a good service through it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dill
import pytest
import redis

import soaf
from soaf import ServiceParamTemplate, UnsafePayload, ValidationError
from soaf.protocol.codec import key_id, sign
from soaf.protocol.keys import Keys
from tests.conftest import SECRET, TESTS, CoreProcess, RedisServer, _work_base, wait_until

RETIRED = "retired-key-0123456789abcdefghij"
MAX_PAYLOAD = 64 * 1024


class Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self, *args):
        raise AssertionError("never called here")

    def __reduce__(self):
        return (self.fn, self.args)


@dataclass
class Bench:
    core: CoreProcess
    client: soaf.Client
    redis: redis.Redis
    keys: Keys
    work_root: Path
    outside: Path
    source: Path
    marker: Path

    def push(self, fields: dict[str, Any]) -> str:
        """XADD an entry by hand, as a plain redis-py user (or an attacker) would."""
        return self.redis.xadd(self.keys.submit, fields).decode()

    def dead_letter(self, entry_id: str) -> dict[str, str]:
        def find() -> dict[str, str] | None:
            for _, data in self.redis.xrange(self.keys.deadletter):
                if data[b"entry"].decode() == entry_id:
                    return {k.decode(): v.decode() for k, v in data.items()}
            return None
        return wait_until(find, 30, message=f"dead letter for {entry_id}")

    def good_run(self) -> None:
        sid = self.client.submit(ServiceParamTemplate("steps", args={"n": 1, "delay": 0.01}))
        assert self.client.wait(sid, timeout=60).state == "succeeded"
        assert self.core.alive()


@pytest.fixture(scope="module")
def bench(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    tmp = tmp_path_factory.mktemp("bad-input")
    plugins = tmp / "plugins"
    shutil.copytree(TESTS / "plugins", plugins, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(TESTS / "programs", plugins / "programs")
    work_root = Path(tempfile.mkdtemp(prefix="soaf-bad-", dir=_work_base()))
    outside = tmp / "outside"
    outside.mkdir()
    (work_root / "escape").symlink_to(outside)  # a link planted under the work root
    source = tmp / "in.txt"
    source.write_text("input data\n")
    prefix = "t" + uuid.uuid4().hex[:10]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOAF_")}
    env.update({
        "SOAF_REDIS_URL": redis_server.url, "SOAF_SECRET": SECRET, "SOAF_PREFIX": prefix,
        "SOAF_NODE": "bad-core", "SOAF_WORK_ROOT": str(work_root), "SOAF_PLUGINS": str(plugins),
        "SOAF_STATE_DIR": str(tmp / "state"), "SOAF_KILL_GRACE": "1", "PYTHONUNBUFFERED": "1",
    })
    core = CoreProcess(env, tmp / "core.log", ["--max-payload", str(MAX_PAYLOAD)]).start()
    client = soaf.Client(redis_server.url, secret=SECRET, prefix=prefix)
    b = Bench(core, client, redis_server.client(), Keys(prefix), work_root, outside, source,
              tmp / "marker")
    yield b
    client.close()
    core.signal(signal.SIGTERM)
    try:
        core.proc.wait(20)  # type: ignore[union-attr]
    except subprocess.TimeoutExpired:
        core.kill()
    shutil.rmtree(work_root, ignore_errors=True)


def signed(obj: Any, secret: str = SECRET) -> bytes:
    return soaf.dumps(obj, secret)


def template(**fields: Any) -> ServiceParamTemplate:
    t = ServiceParamTemplate("steps", args={"n": 1})
    for name, value in fields.items():
        setattr(t, name, value)
    return t


def forged(b: Bench) -> bytes:
    head, kid, mac, _ = signed(template()).split(b":", 3)
    return b":".join([head, kid, mac, pickle.dumps(Call(os.system, f"touch {b.marker}"))])


# (name, entry fields for a service id, where the error goes, words of the error)
# where: "record" = the service's record only; "both" = record and dead letters (the id
# was named in clear but the payload could not be trusted); "dead" = dead letters only.
CASES: list[tuple[str, Callable[[Bench, str], dict[str, Any]], str, str]] = [
    ("garbage bytes", lambda b, sid: {"payload": os.urandom(300)}, "dead",
     "not a signed soaf envelope"),
    ("garbage bytes with an id", lambda b, sid: {"payload": b"\x00\xffjunk", "id": sid}, "both",
     "not a signed soaf envelope"),
    ("empty payload", lambda b, sid: {"payload": b"", "id": sid}, "both", "empty payload"),
    ("entry without a payload field", lambda b, sid: {"id": sid, "other": "x"}, "both",
     "entry has no 'payload' field (fields: id, other)"),
    ("entry without any useful field", lambda b, sid: {"x": ""}, "dead",
     "entry has no 'payload' field (fields: x)"),
    ("valid pickle, unsigned", lambda b, sid: {
        "payload": dill.dumps(template(service_id=sid)), "id": sid}, "both",
     "not a signed soaf envelope"),
    ("os.system pickle, unsigned", lambda b, sid: {
        "payload": pickle.dumps(Call(os.system, f"touch {b.marker}")), "id": sid}, "both",
     "not a signed soaf envelope"),
    ("os.system pickle, signed", lambda b, sid: {
        "payload": sign(pickle.dumps(Call(os.system, f"touch {b.marker}")), SECRET), "id": sid},
     "both", "payload needs posix.system, which soaf refuses to load"),
    ("forged signature", lambda b, sid: {"payload": forged(b), "id": sid}, "both",
     "payload signature does not match (forged or corrupted)"),
    ("signed by a retired key", lambda b, sid: {
        "payload": signed(template(service_id=sid), RETIRED), "id": sid}, "both",
     f"payload signed with key id {key_id(RETIRED)}, which this core does not know"),
    ("oversized payload", lambda b, sid: {
        "payload": signed(template(service_id=sid, args={"blob": "x" * MAX_PAYLOAD})), "id": sid},
     "both", f"exceeds the limit of {MAX_PAYLOAD}"),
    ("pickle of a non-template", lambda b, sid: {
        "payload": signed({"service": "steps", "service_id": sid}), "id": sid}, "both",
     "payload is a dict, not a ServiceParamTemplate"),
    ("missing field", lambda b, sid: {"payload": signed(missing_env(sid))}, "record",
     "env: is missing"),
    ("wrongly typed field", lambda b, sid: {
        "payload": signed(template(service_id=sid, args=["not", "a", "dict"]))}, "record",
     "args: must be a dict, got list"),
    ("non-string env value", lambda b, sid: {
        "payload": signed(template(service_id=sid, env={"N": 3}))}, "record",
     "env: value of N must be a string, got int 3"),
    ("negative timeout", lambda b, sid: {
        "payload": signed(template(service_id=sid, timeout=-5))}, "record",
     "timeout: must be a positive number of seconds or None, got int -5"),
    ("subclass whose validate() skips the checks", lambda b, sid: {
        "payload": signed(lax(sid))}, "record",
     "timeout: must be a positive number of seconds or None, got int -1"),
    ("malformed service_id, clear id given", lambda b, sid: {
        "payload": signed(template(service_id="../bad")), "id": sid}, "record",
     "service_id: must be 1-128 letters, digits or '_.-', got str '../bad'"),
    ("work_path with ..", lambda b, sid: {
        "payload": signed(template(service_id=sid, work_path="../up"))}, "record",
     "work_path: '../up' contains '..'"),
    ("absolute work_path", lambda b, sid: {
        "payload": signed(template(service_id=sid, work_path="/tmp"))}, "record",
     "work_path: '/tmp' is absolute"),
    ("work_path through a symlink leading out", lambda b, sid: {
        "payload": signed(template(service_id=sid, work_path="escape/run"))}, "record",
     "work_path: 'escape/run' resolves to"),
    ("input name with ..", lambda b, sid: {
        "payload": signed(template(service_id=sid, input_files={"../in.txt": str(b.source)}))},
     "record", "input_files: '../in.txt' contains '..'"),
    ("absolute input name", lambda b, sid: {
        "payload": signed(template(service_id=sid, input_files={"/tmp/in.txt": str(b.source)}))},
     "record", "input_files: '/tmp/in.txt' is absolute"),
    ("output name with ..", lambda b, sid: {
        "payload": signed(template(service_id=sid, output_files=["../out/*.txt"]))}, "record",
     "output_files: '../out/*.txt' contains '..'"),
    ("absolute output name", lambda b, sid: {
        "payload": signed(template(service_id=sid, output_files=["/etc/passwd"]))}, "record",
     "output_files: '/etc/passwd' is absolute"),
]


class Lax(ServiceParamTemplate):
    """A subclass that overrides validate() and checks nothing."""

    def validate(self) -> None:
        pass


Lax.__module__ = "__main__"  # so dill sends it by value, like a client script's class


def lax(sid: str) -> ServiceParamTemplate:
    t = Lax("steps", service_id=sid, timeout=-1)
    t.validate()  # passes: only the core's own base check can catch it
    return t


def missing_env(sid: str) -> ServiceParamTemplate:
    t = template(service_id=sid)
    del t.env  # what a subclass that deletes a field sends
    return t


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_bad_entry_is_recorded_and_the_core_carries_on(bench: Bench, name: str) -> None:
    _, make, where, words = next(c for c in CASES if c[0] == name)
    sid = "bad-" + uuid.uuid4().hex[:12]
    entry = bench.push(make(bench, sid))
    if where in ("record", "both"):
        record = bench.client.wait(sid, timeout=60)  # returns as soon as it is refused
        assert record.state == "rejected", record
        assert words in record.error, record.error
        assert record.get("rejected_at") and record.node == "bad-core"
        events = list(bench.client.events(sid, follow=False))
        assert events[-1]["state"] == "rejected" and words in events[-1]["error"]
    if where in ("dead", "both"):
        letter = bench.dead_letter(entry)
        assert words in letter["reason"]
        assert letter["node"] == "bad-core"
        payload = make(bench, sid).get("payload", b"")  # same shape, for the size check
        assert int(letter["size"]) == len(payload) or name == "garbage bytes"
        assert len(bytes.fromhex(letter["preview"])) <= 64
    else:  # a trusted refusal is told on the record alone
        assert all(d[b"entry"].decode() != entry
                   for _, d in bench.redis.xrange(bench.keys.deadletter))
    assert not bench.marker.exists()
    # the entry was acknowledged: nothing is left pending for this core
    wait_until(lambda: bench.redis.xpending(bench.keys.submit, "cores")["pending"] == 0, 30,
               message="the refused entry to be acknowledged")
    bench.good_run()
    assert "Traceback" not in bench.core.log()


def test_symlink_made_by_build_is_not_followed(bench: Bench) -> None:
    t = ServiceParamTemplate("link-in-build", args={"target": str(bench.outside)},
                             input_files={"data/in.txt": str(bench.source)})
    record = bench.client.wait(bench.client.submit(t), timeout=60)
    assert record.state == "failed"
    assert record.get("failed_in") == "work dir check"
    assert "input_files: 'data/in.txt' resolves to" in record.error
    assert str(bench.outside.resolve()) in record.error
    assert not (bench.outside / "in.txt").exists()  # nothing was staged through the link
    bench.good_run()


def test_symlink_made_by_the_program_fails_the_outputs(bench: Bench) -> None:
    t = ServiceParamTemplate("link-in-run", args={"target": str(bench.outside)},
                             output_files=["results/*.csv"])
    record = bench.client.wait(bench.client.submit(t), timeout=60)
    assert record.state == "failed", record
    assert record.get("failure") == "confinement"
    assert "after the run: output_files: 'results' resolves to" in record.error
    bench.good_run()


def test_client_refuses_what_the_core_would_refuse(bench: Bench) -> None:
    """The submitter hears first: nothing reaches Redis for these."""
    before = bench.redis.xlen(bench.keys.submit)
    with pytest.raises(ValidationError, match=r"^timeout: must be a positive number"):
        bench.client.submit(template(timeout=-1))
    with pytest.raises(ValidationError, match=r"^work_path: '../x' contains '..'"):
        bench.client.submit(template(work_path="../x"))
    with pytest.raises(ValidationError, match=r"^env: is missing"):
        bench.client.submit(missing_env("client-side"))
    small = soaf.Client(bench.client.url, secret=SECRET, prefix=bench.keys.prefix,
                        max_payload=4096)
    with pytest.raises(ValidationError, match=r"^payload: the template pickles to .* over the "
                                              "limit of 4096"):
        small.submit(template(args={"blob": "x" * 5000}))
    small.close()
    with pytest.raises(UnsafePayload, match=r"os\._Environ"):
        bench.client.submit(template(args={"environ": os.environ}))
    assert bench.redis.xlen(bench.keys.submit) == before
