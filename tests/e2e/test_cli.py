"""The ``soaf`` command through its installed entry point, in subprocesses and a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import wait_until

SOAF = Path(sys.executable).parent / "soaf"
ID = r"[0-9a-f]{32}"


@pytest.fixture(autouse=True)
def _entry_point_installed():
    if not SOAF.exists():
        pytest.fail(f"{SOAF} is missing: install soaf into this environment (pip install -e .)")


def soaf(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(SOAF), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def submit(env: dict[str, str], *args: str) -> str:
    out = soaf(env, "submit", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def gate(env: dict[str, str], client, n: int) -> tuple[str, Path]:
    """A running ``gate`` service (it advances only when a go<I> file appears) and its work dir."""
    sid = submit(env, "-s", "gate", "-a", f"n={n}", "--watch-interval", "0.05")
    wait_until(lambda: client.status(sid).state == "running", 60, message="gate running")
    return sid, Path(client.status(sid).get("work_dir"))


def lines_until(stream, text: str) -> list[str]:
    """Lines read from a child's output up to the first one containing ``text``."""
    lines: list[str] = []
    while not lines or text not in lines[-1]:
        line = stream.readline()
        assert line, f"output ended before {text!r}: {lines}"
        lines.append(line.rstrip("\n"))
    return lines


def rest_of(waiter: subprocess.Popen, timeout: float = 60) -> tuple[list[str], str]:
    """The rest of a child's output lines (read through the same buffered reader as
    ``lines_until``, which may have read ahead: ``communicate`` would read the pipe
    underneath it and miss those lines), its stderr, once it has ended. A child still
    running after ``timeout`` seconds is killed (its return code says so); that ends the
    reads as long as no process of its own holds the pipes (``soaf wait`` starts none)."""
    assert waiter.stdout is not None and waiter.stderr is not None
    killer = threading.Timer(timeout, waiter.kill)
    killer.start()
    try:
        lines = waiter.stdout.read().splitlines()  # (its stderr is a line or two)
        err = waiter.stderr.read()
        waiter.wait()
    finally:
        killer.cancel()
    return lines, err


def test_help_everywhere(core_env):
    top = soaf(core_env, "--help")
    assert top.returncode == 0
    commands = ["core", "submit", "ls", "status", "wait", "logs", "cancel", "plugins", "nodes",
                "reload", "info", "pipelines", "cache", "services", "dashboard", "resubmit"]
    for command in commands:
        assert command in top.stdout
        out = soaf(core_env, command, "-h")
        assert out.returncode == 0 and out.stdout.startswith(f"Usage: soaf {command}"), command
    for command in ("ls", "status", "wait", "plugins", "nodes", "reload", "info", "pipelines",
                    "services", "cache"):
        assert "--json" in soaf(core_env, command, "--help").stdout, command


def test_usage_errors_exit_2(core_env):
    for args in (["nosuchcommand"], ["wait"], ["submit"], ["cancel"], ["ls", "--limit", "0"],
                 ["submit", "-s", "steps", "-a", "novalue"]):
        out = soaf(core_env, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_unreachable_redis_is_one_clear_line(core_env, tmp_path):
    env = {**core_env, "SOAF_REDIS_URL": f"unix://{tmp_path}/nothing.sock"}
    for args in (["ls"], ["status", "x"], ["wait", "x"], ["nodes"], ["submit", "-s", "true"]):
        out = soaf(env, *args)
        assert out.returncode == 1, args
        assert out.stderr.startswith(f"Error: cannot reach Redis at unix://{tmp_path}/nothing.sock")
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    no_redis = {k: v for k, v in core_env.items() if k != "SOAF_REDIS_URL"}
    out = soaf(no_redis, "ls", "--state-dir", str(tmp_path / "empty"))
    assert out.returncode == 1 and "Error: no Redis to talk to" in out.stderr


def test_submit_wait_status_ls(start_core, core_env):
    start_core()
    sid = submit(core_env, "-s", "steps", "-a", "n=2", "-a", "delay=0.05", "--watch-interval", "0.05")
    assert len(sid) == 32
    out = soaf(core_env, "wait", sid)
    assert out.returncode == 0, out.stderr
    assert f"{sid} steps succeeded" in out.stdout and "\x1b[" not in out.stdout  # no colour in a pipe
    assert out.stderr.strip() == "1 succeeded"
    status = soaf(core_env, "status", sid)
    assert status.returncode == 0
    assert re.search(r"^state +succeeded$", status.stdout, re.M)
    assert re.search(r"^exit code +0$", status.stdout, re.M)
    assert re.search(r"^order \* +\[\"before\", ", status.stdout, re.M)  # set by the handler
    record = json.loads(soaf(core_env, "status", sid, "--json").stdout)
    assert record["service_id"] == sid and record["state"] == "succeeded"
    assert record["fields"]["order"][0] == "before"
    table = soaf(core_env, "ls").stdout.splitlines()
    assert table[0].split() == ["ID", "SERVICE", "STATE", "PROGRESS", "ETA", "NODE", "AGE", "INFO"]
    assert table[2].split()[:6] == [sid, "steps", "succeeded", "100%", "-", "core-a"]
    assert all(line == line.rstrip() for line in table)
    listed = json.loads(soaf(core_env, "ls", "--json", "--service", "steps").stdout)
    assert [r["service_id"] for r in listed] == [sid]
    assert json.loads(soaf(core_env, "ls", "--json", "--state", "failed").stdout) == []


def test_submit_from_files(start_core, core_env, tmp_path):
    start_core()
    py = tmp_path / "job.py"
    py.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from soaf import ServiceParamTemplate

        @dataclass
        class Colored(ServiceParamTemplate):
            color: str = "none"

        template = Colored(service="steps", color="teal", args={"n": 1, "delay": 0.01})
    """))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_text("hello\n")
    js = tmp_path / "jobs.json"
    js.write_text(json.dumps([{"service": "steps", "args": {"n": 1}, "input_files": ["data/in.txt"]},
                              {"service": "true"}]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = submit(core_env, str(py))
    ids = subprocess.run([str(SOAF), "submit", "--wait", str(js)], env=core_env, cwd=elsewhere,
                         capture_output=True, text=True, timeout=60)
    assert ids.returncode == 0, ids.stderr
    second, third = ids.stdout.split()
    record = json.loads(soaf(core_env, "status", first, "--json").stdout)
    assert record["fields"]["extra_after"] == "teal"  # the subclass from the file travelled
    wait = soaf(core_env, "wait", first, second, third, "--json")
    assert wait.returncode == 0
    assert [r["state"] for r in json.loads(wait.stdout)] == ["succeeded"] * 3
    staged = Path(json.loads(soaf(core_env, "status", second, "--json").stdout)["work_dir"])
    assert (staged / "in.txt").read_text() == "hello\n"  # relative to the JSON file
    mixed = soaf(core_env, "submit", str(js), "-s", "true")
    assert mixed.returncode == 2 and "not both" in mixed.stderr
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    out = soaf(core_env, "submit", str(bad))
    assert out.returncode == 2 and "defines no 'template'" in out.stderr


def test_submit_inputs_and_validation(start_core, core_env, tmp_path):
    start_core()
    data = tmp_path / "a.txt"
    data.write_text("x\n")
    sid = subprocess.run([str(SOAF), "submit", "-s", "steps", "-a", "n=1", "-i", "a.txt",
                          "-i", "renamed.txt=a.txt", "--wait"], env=core_env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert sid.returncode == 0, sid.stderr
    work = Path(json.loads(soaf(core_env, "status", sid.stdout.strip(), "--json").stdout)["work_dir"])
    assert (work / "a.txt").read_text() == (work / "renamed.txt").read_text() == "x\n"
    out = soaf(core_env, "submit", "-s", "bad name")
    assert out.returncode == 1 and out.stderr.startswith("Error: service: must be a service name")


def test_wait_exit_code_and_plain_lines(start_core, core_env, client):
    start_core()
    good, work = gate(core_env, client, 2)
    bad = submit(core_env, "-s", "steps", "-a", "n=1", "-a", "code=3")
    waiter = subprocess.Popen([str(SOAF), "wait", good, bad], env=core_env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = lines_until(waiter.stdout, f"{good} gate running")
    (work / "go1").touch()
    lines += lines_until(waiter.stdout, f"{good} gate progress 50%")
    (work / "go2").touch()
    out, err = rest_of(waiter)
    lines += out
    assert waiter.returncode == 1
    assert any(line.startswith(f"{bad} steps failed: exited with code 3") for line in lines)
    at = {line.split(" (ETA ")[0]: n for n, line in enumerate(lines)}  # the ETA may follow
    assert at[f"{good} gate progress 50%"] < at[f"{good} gate progress 100%"]
    assert lines[-1] == f"{good} gate succeeded" or f"{good} gate succeeded" in lines
    assert err.strip() == "1 failed, 1 succeeded"
    unknown = soaf(core_env, "wait", good, "nope")
    assert unknown.returncode == 1 and "no service with id 'nope'" in unknown.stderr
    slow, _ = gate(core_env, client, 1)
    timed = soaf(core_env, "wait", slow, "--timeout", "0.5")
    assert timed.returncode == 1 and "not final after 0.5 s" in timed.stderr
    soaf(core_env, "cancel", slow)


def test_wait_all_follows_new_submissions(start_core, core_env, client):
    start_core()
    first, work = gate(core_env, client, 1)
    waiter = subprocess.Popen([str(SOAF), "wait", "--all"], env=core_env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = lines_until(waiter.stdout, f"{first} gate running")
    second = submit(core_env, "-s", "steps", "-a", "n=1")  # submitted while it waits
    lines += lines_until(waiter.stdout, f"{second} steps")
    (work / "go1").touch()
    out, err = rest_of(waiter)  # (the second service may end within milliseconds)
    lines += out
    assert waiter.returncode == 0, err
    assert f"{first} gate succeeded" in lines and f"{second} steps succeeded" in lines
    assert err.strip() == "2 succeeded"


def test_wait_shows_progress_bars_in_a_terminal(start_core, core_env, client):
    start_core()
    sid, work = gate(core_env, client, 3)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = {k: v for k, v in core_env.items() if k not in ("NO_COLOR", "COLUMNS", "TERM")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen([str(SOAF), "wait", sid], env=env, stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    seen, pos = b"", 0

    def read_until(pattern: bytes) -> None:
        """Read the terminal until ``pattern`` shows after the previous match."""
        nonlocal seen, pos
        deadline = time.monotonic() + 60
        while (found := re.search(pattern, seen[pos:])) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} in {seen[pos:]!r}"
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the other side closed: the program ended
                    chunk = b""
                assert chunk, f"the output ended before {pattern!r}: {seen[pos:]!r}"
                seen += chunk
        pos += found.end()

    # The bar moves as the service advances, one step at a time.
    read_until(rb"\s0% .*running")
    for step, shown in ((1, rb"33% .*running"), (2, rb"67% .*running"), (3, rb"100% .*succeeded")):
        (work / f"go{step}").touch()
        read_until(shown)
    read_until(rb"1 succeeded")
    assert proc.wait(30) == 0
    os.close(master)
    text = seen.decode(errors="replace")
    assert "━" in text  # rich's bar
    assert "\x1b[" in text  # colours and cursor moves: a live display, not plain lines
    assert f"gate {sid[:12]}" in text


def test_logs(start_core, core_env, client):
    start_core()
    sid = submit(core_env, "-s", "steps", "-a", "n=3", "-a", "delay=0.4")
    wait_until(lambda: client.status(sid).state == "running", 20, message="running")
    follow = soaf(core_env, "logs", sid, "-f")
    assert follow.returncode == 0 and follow.stdout.splitlines() == ["step 1", "step 2", "step 3"]
    assert soaf(core_env, "logs", sid, "-n", "1").stdout == "step 3\n"
    assert soaf(core_env, "logs", sid, "--stderr").stdout == "done with 3 steps\n"
    missing = soaf(core_env, "logs", "nope")
    assert missing.returncode == 1 and "no service with id 'nope'" in missing.stderr


def test_cancel(start_core, core_env, client):
    start_core()
    sid = submit(core_env, "-s", "sleep", "-a", "seconds=30")
    wait_until(lambda: client.status(sid).state == "running", 20, message="running")
    out = soaf(core_env, "cancel", sid, "--wait")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"{sid}: cancel requested; it was running and will end cancelled", f"{sid}: cancelled"]
    again = soaf(core_env, "cancel", sid, "nope")
    assert again.returncode == 1
    assert f"{sid}: already cancelled; nothing to cancel" in again.stdout
    assert "nope: no service with id 'nope'" in again.stderr


def test_plugins_nodes_reload(start_core, core_env, client, plugin_dir):
    start_core()
    wait_until(lambda: client.nodes() and client.plugins(), 20, message="heartbeat")
    nodes = json.loads(soaf(core_env, "nodes", "--json").stdout)
    assert [n["node"] for n in nodes] == ["core-a"]
    table = soaf(core_env, "nodes").stdout.splitlines()
    assert table[0].split()[:4] == ["NODE", "HOST", "PID", "LOAD"] and table[2].startswith("core-a")
    plugins = soaf(core_env, "plugins")
    assert plugins.returncode == 0 and "steps" in plugins.stdout and "yes" in plugins.stdout
    out = soaf(core_env, "reload")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("core-a: plugins version 2-")
    (plugin_dir / "services" / "trace.py").write_text("def broken(:\n")
    out = soaf(core_env, "reload", "--json")
    assert out.returncode == 1
    result = json.loads(out.stdout)["core-a"]
    assert result["reloaded"] and "SyntaxError" in result["error"] and result["version"].startswith("2-")
    shown = json.loads(soaf(core_env, "plugins", "--json").stdout)["core-a"]
    assert "SyntaxError" in shown["error"] and shown["alive"] is True
    assert soaf(core_env, "reload", "--node", "nobody").returncode == 1


def test_ctrl_c_exits_130_without_a_traceback(start_core, core_env):
    start_core()
    sid = submit(core_env, "-s", "sleep", "-a", "seconds=30")
    waiter = subprocess.Popen([str(SOAF), "wait", sid], env=core_env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert waiter.stdout is not None
    assert sid in waiter.stdout.readline()  # it is waiting now
    waiter.send_signal(signal.SIGINT)
    _, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 130 and "Traceback" not in err
    soaf(core_env, "cancel", sid)
