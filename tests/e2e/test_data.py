"""Data in and out of work dirs, end to end: URL inputs, outputs, targets, handoff, sweeps."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import soaf
from soaf import ServiceParamTemplate
from soaf.config import RetentionPolicy
from soaf.data import retention
from tests.conftest import ROOT, wait_until
from tests.dataservers import (  # noqa: F401  (fixtures)
    closed_port,
    ftp_files,
    http_files,
    served,
)


def shell(script: str, **fields) -> ServiceParamTemplate:
    args = {"script": script, **fields.pop("args", {})}
    return ServiceParamTemplate("shell", args=args, **fields)


def states(client, sid: str) -> list[str]:
    return [e["state"] for e in client.events(sid, follow=False) if "state" in e]


def test_url_inputs_outputs_and_directory_target(start_core, client, http_files, ftp_files,
                                                 served, tmp_path):
    start_core()
    target = tmp_path / "results"
    t = shell("mkdir -p out && cat a.txt tree/x.txt > out/joined.txt && wc -c < b.bin > out/size.txt",
              input_files={"a.txt": http_files.url("a.txt"), "b.bin": ftp_files.url("b.bin"),
                           "tree": str(served / "tree")},
              output_files=["out/*.txt"], optional_outputs=["debug.log"],
              output_target=str(target / "{service_id}"))
    sid = client.submit(t)
    record = client.wait(sid, timeout=60)
    assert record.state == "succeeded", record.error
    assert states(client, sid) == ["queued", "building", "preparing", "running", "succeeded"]
    assert [(i["name"], i["size"], i["mode"]) for i in record.inputs] == [
        ("a.txt", 17, "download"), ("b.bin", 1 << 20, "download"), ("tree", 6, "copy")]
    assert record.inputs[1]["source"] == ftp_files.url("b.bin")
    joined = b"alpha beta gamma\nx\n"
    assert record.outputs == [
        {"name": "out/joined.txt", "size": len(joined), "sha256": hashlib.sha256(joined).hexdigest(),
         "url": f"{target / sid}/out/joined.txt"},
        {"name": "out/size.txt", "size": (target / sid / "out" / "size.txt").stat().st_size,
         "sha256": hashlib.sha256((target / sid / "out" / "size.txt").read_bytes()).hexdigest(),
         "url": f"{target / sid}/out/size.txt"},
    ]
    assert (target / sid / "out" / "joined.txt").read_bytes() == joined
    assert (target / sid / "out" / "size.txt").read_text().strip() == str(1 << 20)
    assert record.get("output_target") == str(target / sid)
    assert record.get("host") == os.uname().nodename
    # after_watch_callback ran before the collection: it saw no outputs yet.
    assert record.fields["outputs_seen_by_after"] == []


def test_failed_fetch_fails_in_preparing(start_core, client, http_files):
    start_core()
    url = http_files.url("nothere.txt")
    sid = client.submit(shell("touch ran", input_files=[url]))
    record = client.wait(sid, timeout=60)
    assert record.state == "failed"
    assert record.get("failed_in") == "prepare_input_file"
    assert url in record.error and "HTTP 404" in record.error
    assert states(client, sid) == ["queued", "building", "preparing", "failed"]
    assert not (Path(record.get("work_dir")) / "ran").exists()

    far = f"http://127.0.0.1:{closed_port()}/x.txt"
    record = client.wait(client.submit(shell("touch ran", input_files=[far])), timeout=60)
    assert record.state == "failed" and far in record.error and "refused" in record.error


def test_missing_and_optional_outputs(start_core, client):
    start_core()
    missing = client.wait(client.submit(shell("echo a > a.txt", output_files=["a.txt", "b.txt",
                                                                              "c/*.png"])), 60)
    assert missing.state == "failed" and missing.exit_code == 0
    assert missing.get("missing_outputs") == ["b.txt", "c/*.png"]
    assert missing.get("failure") == "missing_outputs"
    assert "missing outputs: b.txt, c/*.png" in missing.error

    optional = client.wait(client.submit(shell("echo a > a.txt", output_files=["a.txt"],
                                               optional_outputs=["b.txt"])), 60)
    assert optional.state == "succeeded"
    assert [o["name"] for o in optional.outputs] == ["a.txt"]

    # Collection runs after after_watch_callback, which may still write an output.
    late = client.wait(client.submit(shell("true", output_files=["after.txt"],
                                           args={"after_write": "after.txt"})), 60)
    assert late.state == "succeeded", late.error
    assert [o["name"] for o in late.outputs] == ["after.txt"]

    # A failed program is not checked for outputs: its own failure is the story.
    failed = client.wait(client.submit(shell("exit 4", output_files=["a.txt"])), 60)
    assert failed.state == "failed" and failed.get("missing_outputs") is None


def test_same_host_handoff_links_without_copying(start_core, client):
    start_core()
    a = client.submit(shell("head -c 300000 /dev/zero > big.bin", output_files=["big.bin"]))
    producer = client.wait(a, 60)
    assert producer.state == "succeeded"
    b = client.submit(shell("wc -c < big.bin > n.txt",
                            input_files=[soaf.output_ref(a, "big.bin")], output_files=["n.txt"]))
    consumer = client.wait(b, 60)
    assert consumer.state == "succeeded", consumer.error
    made = Path(producer.get("work_dir")) / "big.bin"
    used = Path(consumer.get("work_dir")) / "big.bin"
    assert os.stat(made).st_ino == os.stat(used).st_ino  # one file, two names
    assert consumer.inputs[0]["mode"] == "link"
    assert consumer.inputs[0]["resolved"] == str(made)
    assert (Path(consumer.get("work_dir")) / "n.txt").read_text().strip() == "300000"

    ghost = client.wait(client.submit(shell("true", input_files=[soaf.output_ref("ghost", "x")])), 60)
    assert ghost.state == "failed" and "no service with id 'ghost'" in ghost.error


def test_core_sweep_keeps_running_and_shared_dirs(start_core, client, work_root):
    start_core(SOAF_GC_INTERVAL="0.2", SOAF_KEEP_SUCCEEDED_HOURS="0",
               SOAF_KEEP_FAILED_HOURS="inf")
    long = client.submit(shell("sleep 60", work_path="shared"))
    wait_until(lambda: client.status(long).state == "running", 30, message="long service running")
    buddy = client.wait(client.submit(shell("echo hi > buddy.txt", work_path="shared")), 60)
    bad = client.wait(client.submit(shell("exit 3")), 60)
    assert buddy.state == "succeeded" and bad.state == "failed"
    ok = client.wait(client.submit(shell("true")), 60)
    ok_dir = Path(ok.get("work_dir"))
    wait_until(lambda: not ok_dir.exists(), 30, message="the succeeded dir to be swept")
    # The sweeper has run after buddy and bad finished, and kept both dirs:
    shared = work_root.resolve() / "shared"
    assert (shared / "buddy.txt").exists()  # a service still runs in this work_path
    assert Path(bad.get("work_dir")).exists()  # failed: kept for inspection
    assert client.status(long).state == "running"
    client.cancel(long)
    assert client.wait(long, 60).state == "cancelled"
    assert shared.exists()  # cancelled counts as failed: kept (SOAF_KEEP_FAILED_HOURS=inf)


def test_soaf_gc_command_next_to_a_core(start_core, client, core_env, work_root):
    start_core(SOAF_GC_INTERVAL="0")
    ok = client.wait(client.submit(shell("true")), 60)
    bad = client.wait(client.submit(shell("exit 1")), 60)
    long = client.submit(shell("sleep 60"))
    wait_until(lambda: client.status(long).state == "running", 30, message="long service running")
    out = subprocess.run([sys.executable, "-m", "soaf.cli", "gc", "--keep-succeeded-hours", "0",
                          "--keep-failed-hours", "0"],
                         env=core_env, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert f"removed {ok.service_id}" in out.stdout and f"removed {bad.service_id}" in out.stdout
    assert not Path(ok.get("work_dir")).exists() and not Path(bad.get("work_dir")).exists()
    assert (work_root.resolve() / long).exists()
    client.cancel(long)
    client.wait(long, 60)


def test_example_digest_service(start_core, core_env, tmp_path):
    """The docs/data.md example: URL inputs in, checked outputs copied to a target."""
    start_core(SOAF_PLUGINS=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "digest_client.py")],
                         env=core_env, cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "succeeded on core-a" in out.stdout
    results = next((tmp_path / "results").iterdir())
    reports = sorted(p.name for p in (results / "reports").iterdir())
    assert reports == ["alpha.txt.json", "beta.txt.json", "delta.txt.json", "gamma.txt.json"]
    summary = json.loads((results / "summary.json").read_text())
    data = ROOT / "examples" / "data"
    assert summary["words"] == sum(len(p.read_text().split()) for p in data.glob("*.txt"))
    assert f"summary: {json.dumps(summary)}" in out.stdout


def test_missing_outputs_is_retried_and_cleared_by_the_next_attempt(start_core, client):
    start_core()
    script = 'if [ "$SOAF_ATTEMPT" = 2 ]; then echo ok > a.txt; fi'
    record = client.wait(client.submit(shell(script, output_files=["a.txt"], retries=1,
                                             retry_backoff=0.1)), 60)
    assert record.state == "succeeded", record.error
    first, second = record.get("attempts")
    assert (first["state"], first["failure"]) == ("failed", "missing_outputs")
    assert second["state"] == "succeeded"
    assert record.get("missing_outputs") is None and record.get("failure") is None
    assert [o["name"] for o in record.outputs] == ["a.txt"]
    root = Path(record.get("work_dir")).parent
    marker = json.loads((root / ".soaf" / "runs" / f"{record.service_id}.json").read_text())
    assert marker["state"] == "succeeded" and marker["outputs"] == ["a.txt"]
    # The first attempt's dir, set aside for the retry, is recycled like a failed run.
    aside = root / f"{record.service_id}.attempt1"
    assert aside.is_dir()
    report = retention.sweep(root, RetentionPolicy(keep_failed_hours=0, on_success="keep"))
    assert {r["dir"] for r in report.removed} == {aside.name}
    assert not aside.exists() and Path(record.get("work_dir")).is_dir()


def test_pipeline_hands_outputs_on_as_read_only_links(start_core, client):
    start_core()
    with soaf.Pipeline(client) as p:
        a = p.run(shell("head -c 300000 /dev/urandom > big.bin", output_files=["big.bin"]))
        b = p.run(lambda a: shell("wc -c < big.bin > n.txt; sha256sum big.bin > sum.txt",
                                  input_files=[a.output("big.bin")],
                                  output_files=["n.txt", "sum.txt"]), after=[a])
        producer, consumer = a.wait(60), b.wait(60)
    made = Path(producer.get("work_dir")) / "big.bin"
    used = Path(consumer.get("work_dir")) / "big.bin"
    assert consumer.inputs[0]["mode"] in ("reflink", "link")
    assert consumer.inputs[0]["source"] == soaf.output_ref(a.service_id, "big.bin")
    assert consumer.inputs[0]["resolved"] == str(made)
    if consumer.inputs[0]["mode"] == "link":
        assert os.stat(made).st_ino == os.stat(used).st_ino  # one file, two names
        assert os.stat(used).st_mode & 0o222 == 0  # and nobody's to write
    assert (Path(consumer.get("work_dir")) / "n.txt").read_text().strip() == "300000"
    digest = hashlib.sha256(made.read_bytes()).hexdigest()
    assert (Path(consumer.get("work_dir")) / "sum.txt").read_text().split()[0] == digest
