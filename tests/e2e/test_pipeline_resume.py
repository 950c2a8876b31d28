"""Named pipelines end to end: a client killed mid-pipeline, run again, runs no step twice."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from soaf import Pipeline, PipelineError, ServiceParamTemplate, StepFailed
from soaf.client.ledger import describe
from soaf.protocol.content import template_digest
from tests.conftest import ROOT, wait_until
from tests.e2e.test_cli import soaf
from tests.e2e.test_pipeline import example_core  # noqa: F401  (a fixture)


def start_example(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / "resumable.py"), *args],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def step_states(client, name: str) -> dict[str, tuple[str, str]]:
    found = describe(client, name)
    return {s["step"]: (s["state"], s["service_id"]) for s in (found or {"steps": []})["steps"]}


def test_a_killed_client_run_again_runs_no_step_twice(example_core, core_env, client):
    args = ("--name", "nightly-42", "--delay", "3")
    first = start_example(core_env, *args)
    try:  # kill -9 while the middle step runs: the first step succeeded, the last never began
        states = wait_until(lambda: (s := step_states(client, "nightly-42")).get(
            "count", ("",))[0] == "running" and s, 90, interval=0.05, message="count running")
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.communicate()
    assert states["tokenize"][0] == "succeeded" and "merge" not in states

    again = start_example(core_env, *args)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, out + err
    lines = {m[0]: m[1:] for m in re.findall(r"^(\w+) +(attached to|submitted) +(\w+) (\w+)$",
                                             out, re.M)}
    assert lines["tokenize"] == ("attached to", states["tokenize"][1], "succeeded")
    assert lines["count"] == ("attached to", states["count"][1], "succeeded")
    assert lines["merge"][0] == "submitted" and lines["merge"][2] == "succeeded"
    # One service per step, each with one attempt: nothing ran twice.
    records = client.list(limit=100)
    assert collections.Counter(r.service for r in records) == {
        "tokenize": 1, "count": 1, "merge": 1}
    assert all(r.ok and len(r.get("attempts") or [1]) == 1 for r in records)
    assert "top words: [[" in out

    assert 0 < client.redis.ttl(client.keys.pipeline("nightly-42")) <= 30 * 86400
    listed = soaf(core_env, "pipelines")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^nightly-42 +tokenize +tokenize +succeeded", listed.stdout, re.M)
    assert re.search(rf"^ +merge +merge +succeeded +100% +{lines['merge'][1]}",
                     listed.stdout, re.M), listed.stdout


def sleeper(seconds: float = 30) -> ServiceParamTemplate:
    return ServiceParamTemplate("sleep", args={"seconds": seconds})


def steps(n: int = 1, code: int = 0) -> ServiceParamTemplate:
    return ServiceParamTemplate("steps", args={"n": n, "delay": 0.05, "code": code})


def test_failed_and_changed_steps_run_again_succeeded_ones_do_not(start_core, client):
    start_core()
    with pytest.raises(StepFailed, match="exited with code 3"), \
            Pipeline(client, name="p1") as p:
        a = p.run(steps())
        b = p.run(lambda a: steps(code=3), after=[a])
        c = p.run(steps(n=2))
    assert (a.name, b.name, c.name) == ("step-1", "step-2", "step-3")
    first = {s.name: s.service_id for s in (a, b, c)}

    with Pipeline(client, name="p1") as p:
        a2 = p.run(steps())
        b2 = p.run(lambda a: steps(code=3), after=[a2])  # the same template: it failed, so again
        c2 = p.run(steps(n=3))  # a changed template is a new step
        with pytest.raises(StepFailed):
            b2.wait(timeout=60)
        c2.wait(timeout=60)
    assert a2.attached and a2.service_id == first["step-1"]
    assert not b2.attached and b2.service_id != first["step-2"]
    assert not c2.attached and c2.service_id != first["step-3"]
    assert len(client.list(service="steps", limit=100)) == 5

    with Pipeline(client, name="p1") as p:  # all done: everything attaches, nothing runs
        assert p.run(steps()).attached and p.run(steps(n=3), name="step-3").attached
    assert len(client.list(service="steps", limit=100)) == 5


def test_a_step_recorded_but_never_submitted_is_submitted_under_its_id(start_core, client):
    """The client died between recording a step and submitting it."""
    start_core()
    template = steps()
    client.redis.hset(client.keys.pipeline("p2"), "only", json.dumps(
        {"id": "recorded-id", "digest": template_digest(template), "service": "steps", "n": 1}))
    with Pipeline(client, name="p2") as p:
        step = p.run(template, name="only")
    assert step.service_id == "recorded-id" and not step.attached and step.ok


def test_names_are_checked(start_core, client):
    with pytest.raises(PipelineError, match="pipeline name 'no way'"):
        Pipeline(client, name="no way")
    p = Pipeline(client, name="p3")
    p.run(ServiceParamTemplate("true"), name="x")
    with pytest.raises(PipelineError, match="step name 'x' is used twice"):
        p.run(ServiceParamTemplate("true"), name="x")


def test_soaf_pipelines_cancel_stops_running_steps_and_the_script(start_core, client, core_env):
    start_core()
    p = Pipeline(client, name="p4")
    a = p.run(sleeper())
    wait_until(lambda: client.status(a.service_id).state == "running", 30, message="running")
    shown = soaf(core_env, "pipelines", "show", "p4", "--json")
    assert json.loads(shown.stdout)["steps"][0]["state"] == "running"
    out = soaf(core_env, "pipelines", "cancel", "p4")
    assert out.returncode == 0, out.stderr
    assert "step-1: cancel requested" in out.stdout
    with pytest.raises(StepFailed, match="cancelled"):
        a.wait(timeout=60)
    with pytest.raises(PipelineError, match="was cancelled"):
        p.run(sleeper(1))  # this run of the script submits no more
    assert re.search(r"^p4 \(cancelled\) +step-1 +sleep +cancelled",
                     soaf(core_env, "pipelines").stdout, re.M)
    client.redis.zadd(client.keys.pipelines, {"expired": 1.0})  # its hash is gone
    assert "expired" not in soaf(core_env, "pipelines").stdout
    assert client.redis.zscore(client.keys.pipelines, "expired") is None
    missing = soaf(core_env, "pipelines", "cancel", "nosuch")
    assert missing.returncode == 1 and "no pipeline named 'nosuch'" in missing.stderr
    # A new run of the script starts afresh: the cancelled step is submitted again.
    with Pipeline(client, name="p4") as again:
        step = again.run(sleeper(0.1))
    assert step.ok and not step.attached


def test_ctrl_c_still_cancels_the_running_steps(example_core, core_env, client):
    proc = start_example(core_env, "--name", "p5", "--delay", "30")
    try:
        sid = wait_until(lambda: step_states(client, "p5").get("tokenize", ("", ""))[0]
                         == "running" and step_states(client, "p5")["tokenize"][1], 90,
                         message="tokenize running")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert client.wait(sid, timeout=60).state == "cancelled"
