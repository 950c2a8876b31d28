"""What a program costs and how it fails, measured on real programs: peak memory, CPU time,
memory limits, streamed output and the stderr tail of a failure."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from soaf import ServiceParamTemplate
from tests.conftest import wait_until

MIB = 1024


def test_peak_memory_and_cpu_time_are_the_programs(start_core, client):
    start_core()
    big = client.submit(ServiceParamTemplate("alloc", args={"argv": [200, 1.0]}))
    small = client.submit(ServiceParamTemplate("shell", args={"script": "sleep 1"}))
    burn = client.submit(ServiceParamTemplate("shell", args={
        "script": f"{sys.executable} -c 'import time\nt=time.process_time()+0.5\n"
                  "while time.process_time() < t: pass'"}))
    big, small, burn = (client.wait(sid, timeout=60) for sid in (big, small, burn))
    assert big.state == "succeeded", big
    # 200 MiB allocated on top of Python's own ~10 MiB
    assert 200 * MIB * 0.9 <= big.get("max_rss_kb") <= 200 * MIB * 1.1 + 12 * MIB, big
    assert small.state == "succeeded"
    assert 0 < small.get("max_rss_kb") < 10 * MIB, small
    assert small.get("cpu_time") < 0.05, small
    assert 0.5 <= burn.get("cpu_time") < 0.8, burn
    # the record's pid is the program's: the spawner starts it, no shim stands between
    for record in (big, small):
        assert record.get("pid") and record.get("shim_pid") is None


def test_a_failure_ends_with_the_last_lines_of_stderr(start_core, client):
    start_core()
    failed = client.submit(ServiceParamTemplate("shell", args={
        "script": "for i in 1 2 3 4 5 6 7; do echo \"problem $i\" >&2; done; "
                  "printf 'almost\\rdone\\n' >&2; exit 3"}))
    hung = client.submit(ServiceParamTemplate("shell", timeout=1, args={
        "script": "echo 'waiting for a lock' >&2; exec sleep 30"}))
    quiet = client.submit(ServiceParamTemplate("shell", args={"script": "exit 4"}))
    huge = client.submit(ServiceParamTemplate("shell", args={
        "script": f"{sys.executable} -c 'print(\"x\" * 5000)' >&2; exit 1"}))
    failed, hung, quiet, huge = (client.wait(s, timeout=60) for s in (failed, hung, quiet, huge))
    assert failed.state == "failed"
    assert failed.error == (f"exited with code 3 (see soaf logs {failed.service_id} --stderr); "
                            "last lines of stderr:\n"
                            "problem 4\nproblem 5\nproblem 6\nproblem 7\ndone")
    assert hung.state == "timed_out"
    assert hung.error.startswith("ran past its timeout (1 s)")
    assert hung.error.endswith("; last lines of stderr:\nwaiting for a lock")
    assert quiet.error == "exited with code 4"  # nothing on stderr, nothing added
    assert huge.error.endswith("x" * 1024) and len(huge.error) < 1150  # the tail, no more
    assert failed.get("attempts")[-1]["error"] == failed.error


def test_a_memory_limit_holds_against_a_fast_allocator(start_core, client):
    start_core()
    # ~200 MiB/s towards 1 GiB, with a limit of 150 MiB
    record = client.wait(client.submit(ServiceParamTemplate(
        "alloc", args={"argv": [1024, 0, 200]}, max_memory_mb=150)), timeout=60)
    assert record.state == "failed" and record.get("failure") == "memory", record
    assert record.get("signal") == "SIGKILL"
    assert 150 * MIB < record.get("max_rss_kb") < 1.5 * 150 * MIB, record
    assert "over its memory limit of 150 MiB" in record.error


def test_progress_redrawn_with_carriage_returns_streams(start_core, client):
    start_core()
    sid = client.submit(ServiceParamTemplate("shell", args={
        "script": "i=0; while [ $i -lt 60 ]; do printf '\\rprogress %d/60' $i; i=$((i+1)); "
                  "sleep 0.05; done; printf '\\rfinished   \\n'"}))
    seen = []
    for line in client.follow_logs(sid, timeout=60):
        if line.text.startswith("progress") and not seen:
            # it arrives while the program still redraws its line
            assert client.status(sid).state == "running"
        seen.append(line.text)
    assert client.wait(sid, timeout=30).state == "succeeded"
    progress = [t for t in seen if t.startswith("progress")]
    assert progress and len(progress) < 20, seen  # one per log pass, not one per redraw
    assert seen[-1].rstrip() == "finished"


def test_status_shows_what_ran_what_it_cost_and_how_it_ended(start_core, client, core_env,
                                                                 tmp_path):
    start_core()
    (tmp_path / "in.txt").write_text("hello\n")
    target = tmp_path / "results"
    sid = client.submit(ServiceParamTemplate(
        "steps", args={"n": 2, "delay": 0.2}, input_files={"in.txt": str(tmp_path / "in.txt")},
        output_files=["step*.txt"], output_target=str(target)))
    record = client.wait(sid, timeout=60)
    assert record.ok, record
    out = subprocess.run([str(Path(sys.executable).parent / "soaf"), "status", sid],
                         env={**core_env, "COLUMNS": "200"}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert re.search(r"^command +\./steps\.sh 2 0\.2 0$", text, re.M), text
    assert re.search(rf"^pid +{record.get('pid')}$", text, re.M)  # its own (no shim)
    assert re.search(rf"^inputs +in\.txt +6 B +<- {re.escape(str(tmp_path))}/in\.txt$", text, re.M)
    sha = record.outputs[0]["sha256"][:16]
    assert re.search(rf"^outputs +step1\.txt +7 B +sha256 {sha} +-> {re.escape(str(target))}",
                     text, re.M), text
    assert re.search(r"^ +step2\.txt +7 B +sha256 ", text, re.M)
    assert re.search(r"^cpu time +\d+\.\d{3} s$", text, re.M)
    assert re.search(r"^attempts +#1 succeeded on core-a, \d+\.\d s$", text, re.M)


def test_wait_all_follow_watches_until_ctrl_c(start_core, client, core_env, tmp_path):
    start_core()
    # The first service runs until the watcher shows it: a service that ended before the
    # watcher started is none of its business, and the watcher may take seconds to start.
    go = tmp_path / "go"
    first = client.submit(ServiceParamTemplate(
        "shell", args={"script": f"while [ ! -e {go} ]; do sleep 0.05; done"}))
    watcher = subprocess.Popen([str(Path(sys.executable).parent / "soaf"), "wait", "--all",
                                "--follow"], env=core_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(watcher.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(first in line for line in lines), 60,
                   message="the watcher to show the first service")
        go.touch()
        client.wait(first, timeout=30)
        # idle for longer than `--all` lingers (2 s), then a new service: still watched
        time.sleep(3.5)
        assert watcher.poll() is None
        second = client.submit(ServiceParamTemplate("shell", args={"script": "exit 2"}))
        client.wait(second, timeout=30)
        wait_until(lambda: any(f"{second} shell failed" in line for line in lines), 30,
                   message="the watcher to show the end of the second service")
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(timeout=30)
        reader.join(timeout=10)
    err = watcher.stderr.read() if watcher.stderr else ""
    out = "".join(lines)
    assert f"{first} shell succeeded" in out and f"{second} shell failed" in out, out
    assert err.strip().endswith("1 failed, 1 succeeded"), err
    assert watcher.returncode == 1
