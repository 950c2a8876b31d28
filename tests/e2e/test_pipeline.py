"""Pipelines end to end: the two examples with their real programs, failures, cancelling."""

from __future__ import annotations

import collections
import functools
import http.server
import itertools
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from soaf import (
    Pipeline,
    PipelineError,
    ServiceParamTemplate,
    StepFailed,
    ValidationError,
    WaitTimeout,
)
from tests.conftest import ROOT, wait_until

EXAMPLES = ROOT / "examples"


@pytest.fixture
def example_core(start_core, tmp_path):
    """A core serving the repository's own plugins (services/, handlers/, their programs)."""
    root = tmp_path / "example-plugins"
    for part in ("services", "handlers", "examples/programs"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    return start_core(SOAF_PLUGINS=str(root))


def run_example(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


def test_loop_example_runs_until_the_check_passes(example_core, core_env, client):
    out = run_example("loop.py", core_env, "--delay", "0.1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "passed after 4 rounds: sqrt(2) ~ 1.41421356237" in out.stdout
    refines = re.findall(r"refine ([0-9a-f]{32}) submitted", out.stdout)
    evaluates = re.findall(r"evaluate ([0-9a-f]{32}): estimate", out.stdout)
    assert len(refines) == len(evaluates) == 4
    errors = [client.status(sid).fields["error"] for sid in evaluates]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-9 < errors[-2]
    work = {sid: Path(client.status(sid).get("work_dir")) for sid in refines + evaluates}
    # A's output went to B, and back to the next A: the data really flowed between steps.
    for a, b in zip(refines, evaluates):
        assert (work[a] / "refined.txt").read_text() == (work[b] / "estimate.txt").read_text()
    for before, after in itertools.pairwise(refines):
        assert (work[before] / "refined.txt").read_text() == (work[after] / "estimate.txt").read_text()
        assert client.status(after).get("queued_at") > client.status(before).get("finished_at")


def test_diamond_example_starts_e_after_b_and_d(example_core, core_env, client):
    out = run_example("diamond.py", core_env, "--delay", "0.3")
    assert out.returncode == 0, out.stdout + out.stderr
    ids = dict(re.findall(r"^([ABCDE]) \w+ +([0-9a-f]{32}) succeeded$", out.stdout, re.M))
    assert sorted(ids) == ["A", "B", "C", "D", "E"]
    rec = {name: client.status(sid) for name, sid in ids.items()}
    assert [rec[n].service for n in "ABCDE"] == ["tokenize", "count", "tokenize", "count", "merge"]
    # A and C ran side by side; E was submitted only once both B and D had finished.
    assert rec["C"].get("running_at") < rec["A"].get("finished_at")
    assert rec["A"].get("running_at") < rec["C"].get("finished_at")
    for first in ("B", "D"):
        assert rec["E"].get("queued_at") > rec[first].get("finished_at")
        assert rec["E"].get("running_at") > rec[first].get("finished_at")
    words = re.findall(r"[a-z0-9']+", ((EXAMPLES / "data" / "alpha.txt").read_text()
                                       + " " + (EXAMPLES / "data" / "beta.txt").read_text()).lower())
    top = sorted(collections.Counter(words).items(), key=lambda wc: (-wc[1], wc[0]))[:5]
    assert rec["E"].fields["top"] == [list(pair) for pair in top]
    merged = Path(rec["E"].get("work_dir")) / "merged.json"
    assert json.loads(merged.read_text()) == dict(sorted(collections.Counter(words).items()))


def test_outputs_as_urls_are_downloaded_by_the_next_step(example_core, client, work_root):
    """Cores on other machines: outputs reach the next step as URLs it downloads."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(work_root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Pipeline(client, url_base=f"http://127.0.0.1:{server.server_port}") as p:
            a = p.run(ServiceParamTemplate("tokenize", args={"delay": 0},
                                           input_files={"text.txt": str(EXAMPLES / "data" / "gamma.txt")},
                                           output_files=["words.txt"]))
            b = p.run(lambda a: ServiceParamTemplate(
                "count", args={"delay": 0}, input_files={"words.txt": a.output("words.txt")},
                output_files=["counts.json"]), after=[a])
            record = b.wait(timeout=60)
            url = a.output("words.txt")
        assert url == f"http://127.0.0.1:{server.server_port}/{a.service_id}/words.txt"
        words = re.findall(r"[a-z0-9']+", (EXAMPLES / "data" / "gamma.txt").read_text().lower())
        assert record.fields["distinct"] == len(set(words))
        assert b.outputs == {"counts.json": f"http://127.0.0.1:{server.server_port}/"
                                            f"{b.service_id}/counts.json"}
    finally:
        server.shutdown()


def sleeper(seconds: float = 30) -> ServiceParamTemplate:
    return ServiceParamTemplate("sleep", args={"seconds": seconds})


def steps(code: int = 0, n: int = 1) -> ServiceParamTemplate:
    return ServiceParamTemplate("steps", args={"n": n, "delay": 0.05, "code": code},
                                output_files=["step*.txt"])


def test_failure_stops_only_its_dependants(start_core, client):
    start_core()
    with Pipeline(client) as p:
        a = p.run(steps(code=3), name="A")
        b = p.run(lambda a: steps(), after=[a], name="B")
        c = p.run(steps(n=2), name="C")
        e = p.run(lambda b, c: steps(), after=[b, c], name="E")
        with pytest.raises(StepFailed) as caught:
            e.wait(timeout=60)
        assert c.wait(timeout=60).ok  # the independent branch went on
        report = p.report()
    failure = caught.value
    assert failure.step is e and failure.cause is a
    assert "step 'E'" in str(failure) and "skipped" in str(failure)
    assert "step 'A'" in str(failure) and "exited with code 3" in str(failure)
    assert (a.state, b.state, c.state, e.state) == ("failed", "skipped", "succeeded", "skipped")
    assert b.service_id is None and e.service_id is None  # never submitted
    assert re.search(r"^A +steps +failed +([0-9a-f]{32}) exited with code 3 \(see soaf logs "
                     r"\1 --stderr\); last lines of stderr:\n +\| done with \d+ steps$",
                     report, re.M), report
    assert str(failure).endswith("last lines of stderr:\ndone with 1 steps")
    assert re.search(r"^E +\S+ +skipped +- +step 'A'", report, re.M)
    assert sorted(c.outputs) == ["step1.txt", "step2.txt"]
    assert Path(c.outputs["step2.txt"]).read_text() == "step 2\n"


def test_unobserved_failure_raises_when_the_pipeline_ends(start_core, client):
    start_core()
    with pytest.raises(StepFailed, match="exited with code 4"), Pipeline(client) as p:
        p.run(steps(code=4))
        p.run(steps())


def test_cancel_cancels_running_steps_and_skips_waiting_ones(start_core, client):
    start_core()
    p = Pipeline(client)
    a, b = p.run(sleeper()), p.run(sleeper())
    c = p.run(lambda a: steps(), after=[a], name="C")
    assert (a.state, c.state) == ("submitted", "waiting")
    wait_until(lambda: client.status(a.service_id).state == "running"
               and client.status(b.service_id).state == "running", 30, message="running")
    assert re.search(rf"^sleep +sleep +running +{a.service_id}$", p.report(), re.M)
    assert re.search(r"^C +- +waiting +-$", p.report(), re.M)
    p.cancel(timeout=60)
    assert (a.state, b.state, c.state) == ("cancelled", "cancelled", "skipped")
    assert client.status(a.service_id).state == client.status(b.service_id).state == "cancelled"
    assert c.service_id is None
    with pytest.raises(StepFailed, match="cancelled"):
        a.wait()
    with pytest.raises(PipelineError, match="cancelled"):
        p.run(steps())


def test_an_exception_in_the_block_cancels_the_pipeline(start_core, client):
    start_core()
    with pytest.raises(RuntimeError, match="changed my mind"), Pipeline(client) as p:
        a = p.run(sleeper())
        wait_until(lambda: client.status(a.service_id).state == "running", 30, message="running")
        raise RuntimeError("changed my mind")
    assert a.state == "cancelled"


def test_template_problems(start_core, client):
    start_core()
    with Pipeline(client) as p:
        with pytest.raises(ValidationError, match="service"):
            p.run(ServiceParamTemplate("bad name"))
        a = p.run(ServiceParamTemplate("true"))
        broken = p.run(lambda a: 1 / 0, after=[a], name="broken")
        after = p.run(lambda b: steps(), after=[broken])
        with pytest.raises(StepFailed, match="ZeroDivisionError"):
            after.wait(timeout=60)
        missing = p.run(lambda a: steps(), after=[a])
        missing.wait(timeout=60)
        with pytest.raises(PipelineError, match=r"wrote no 'nothing\.txt'"):
            missing.output("nothing.txt")
    assert broken.state == "error" and after.state == "skipped"


def test_gather(start_core, client):
    start_core()
    with Pipeline(client) as p:
        a, b = p.run(steps(n=2)), p.run(steps(n=1))
        records = p.gather(a, b, timeout=60)
        assert [r.service_id for r in records] == [a.service_id, b.service_id]
        assert all(r.ok for r in records)
        slow, bad = p.run(sleeper()), p.run(steps(code=5))
        with pytest.raises(StepFailed, match="exited with code 5"):
            p.gather(slow, bad, timeout=60)  # as soon as one fails, not when all are done
        assert not slow.done()
        with pytest.raises(WaitTimeout, match=r"not done after 0\.2 s"):
            p.gather(slow, timeout=0.2)
        p.cancel()  # no StepFailed when the block ends: the cancel was asked for
    assert slow.state == "cancelled"
