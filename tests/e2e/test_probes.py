"""Progress without code: the core measures a service's progress probe, and every progress
comes with an ETA in the record, the events, `soaf ls` and `soaf wait`."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from soaf import ServiceParamTemplate
from tests.conftest import wait_until
from tests.e2e.test_cli import SOAF, lines_until, rest_of, soaf
from tests.e2e.test_pipeline import example_core, run_example  # noqa: F401  (a fixture)


def running(client, sid):
    return wait_until(lambda: (r := client.status(sid)).state == "running" and r, 30,
                      message=f"{sid} running")


@pytest.mark.parametrize("service", ["probe-files", "probe-log", "probe-file"])
def test_a_probe_sets_the_progress_and_an_eta(start_core, client, core_env, service):
    start_core()
    sid = client.submit(ServiceParamTemplate(service, args={"n": 4}, watch_interval=0.05))
    work = Path(running(client, sid).get("work_dir"))
    for i in range(1, 4):
        (work / f"go{i}").touch()
        record = wait_until(lambda i=i: (r := client.status(sid)).progress == i / 4 and r,
                            30, message=f"progress {i}/4")
    # Three advances make a rate: the record says when the rest should be done.
    assert record.eta is not None and record.eta > record.get("running_at")
    row = next(line for line in soaf(core_env, "ls").stdout.splitlines() if sid in line)
    assert re.match(rf"{sid} +{service} +running +75% +(\d+[smhd]|overdue) ", row), row
    events = [e for e in client.events(sid, follow=False) if "progress" in e]
    assert all("eta" in e for e in events) and isinstance(events[-1]["eta"], float)
    (work / "go4").touch()
    final = client.wait(sid, timeout=60)
    assert final.ok and final.progress == 1.0 and final.eta is None  # final: no ETA
    assert "callback_error" not in final.raw
    if service == "probe-log":  # its own handler ran beside the probe
        assert final.fields["chunks_seen"] >= 3
    else:
        assert final.fields["file_count"] >= 4  # the default handler, wrapped


def test_soaf_wait_shows_the_eta(start_core, client, core_env):
    start_core()
    sid = client.submit(ServiceParamTemplate("probe-file", args={"n": 3}, watch_interval=0.05))
    work = Path(running(client, sid).get("work_dir"))
    waiter = subprocess.Popen([str(SOAF), "wait", sid], env=core_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        lines_until(waiter.stdout, f"{sid} probe-file running")
        (work / "go1").touch()
        wait_until(lambda: client.status(sid).progress == 1 / 3, 30, message="a third")
        time.sleep(0.2)  # a measurable rate between the two steps
        (work / "go2").touch()
        wait_until(lambda: client.status(sid).progress == 2 / 3, 30, message="two thirds")
        (work / "go3").touch()
        lines, err = rest_of(waiter)
        out = "\n".join(lines)
    finally:
        waiter.kill()
    assert waiter.returncode == 0, err
    assert re.search(rf"^{sid} probe-file progress 67% \(ETA \d+[smhd]\)$", out, re.M), out


def test_a_failing_probe_is_recorded_once_and_the_service_goes_on(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("probe-broken", args={"n": 2}, watch_interval=0.05))
    work = Path(running(client, sid).get("work_dir"))
    (work / "go1").touch()
    (work / "go2").touch()
    final = client.wait(sid, timeout=60)
    assert final.ok
    assert final.get("callback_errors") == 1
    assert "progress probe probes.files('out/*.json') raised KeyError" in final.get("callback_error")


def test_the_progress_example(example_core, core_env):
    out = run_example("progress_client.py", core_env, "--chunks", "6", "--delay", "0.3")
    assert out.returncode == 0, out.stdout + out.stderr
    progress = re.findall(r"^  progress (\d+)%(, about [\d.]+ s left)?$", out.stdout, re.M)
    assert [int(p) for p, _ in progress] == sorted(int(p) for p, _ in progress)
    assert progress[-1][0] == "100" and any(left for _, left in progress[:-1]), out.stdout
    assert out.stdout.rstrip().endswith("succeeded: 6 chunks written")
