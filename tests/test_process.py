"""The runner with real processes: start failures in plain words, stop, reaping, rusage."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from soaf.errors import ProgramError
from soaf.process.reaper import Reaper
from soaf.process.spawn import Exit, Process, group_rss_kb
from tests.conftest import ROOT, wait_until


@pytest.fixture
def reaper():
    r = Reaper()
    yield r
    r.close()


def process(tmp_path: Path, argv: list[str], cwd: Path | None = None) -> Process:
    return Process(argv, cwd=cwd or tmp_path, env=dict(os.environ),
                   stdout=tmp_path / "out.log", stderr=tmp_path / "err.log")


def run(tmp_path: Path, reaper: Reaper, argv: list[str], **kw) -> Exit:
    p = process(tmp_path, argv, **kw)
    p.start(reaper)
    assert p.exited.wait(30)
    assert p.exit is not None
    return p.exit


START_FAILURES = [
    (None, ["./nope"], None, "executable not found: ./nope"),
    ("noexec", ["./script.sh"], None, "permission denied running ./script.sh (is it executable?)"),
    ("dir", ["./adir"], None, "./adir is a directory, not a program"),
    ("noshebang", ["./binary"], None, "is not a program this machine can run"),
    (None, ["true"], "missing", "does not exist"),
    ("file", ["true"], "afile", "is not a directory"),
]


@pytest.mark.parametrize("setup, argv, cwd, expected", START_FAILURES)
def test_start_failures_in_plain_words(tmp_path, reaper, setup, argv, cwd, expected):
    if setup == "noexec":
        (tmp_path / "script.sh").write_text("#!/bin/sh\necho hi\n")
    elif setup == "dir":
        (tmp_path / "adir").mkdir()
    elif setup == "noshebang":
        (tmp_path / "binary").write_bytes(b"\x7fELF garbage")
        (tmp_path / "binary").chmod(0o755)
    elif setup == "file":
        (tmp_path / "afile").write_text("")
    p = process(tmp_path, argv, cwd=tmp_path / cwd if cwd else None)
    with pytest.raises(ProgramError) as info:
        p.start(reaper)
    assert expected in str(info.value)
    if cwd:
        assert f"working directory {tmp_path / cwd}" in str(info.value)


def test_exit_code_signal_and_rusage(tmp_path, reaper):
    assert run(tmp_path, reaper, ["sh", "-c", "exit 7"]).exit_code == 7
    killed = run(tmp_path, reaper, ["sh", "-c", "kill -TERM $$"])
    assert killed.exit_code is None and killed.signal == "SIGTERM" and killed.returncode == -15
    p = process(tmp_path, [sys.executable, "-c", textwrap.dedent("""
        import time
        hold = bytearray(30 * 1024 * 1024)
        for i in range(0, len(hold), 4096):
            hold[i] = 1
        end = time.process_time() + 0.4
        while time.process_time() < end:
            pass
    """)])
    p.start(reaper)
    wait_until(lambda: p.rss_kb() >= 30 * 1024 or p.exited.is_set(), 10)  # a sample
    assert p.exited.wait(30) and (busy := p.exit) is not None
    assert busy.exit_code == 0 and p.program_pid == p.pid  # not shimmed: the leader
    assert busy.cpu_time >= 0.35 and busy.max_rss_kb >= 30 * 1024 and busy.wall_time > 0
    # a program that ends before its first sample has no peak, unless its rusage tells
    quick = run(tmp_path, reaper, ["true"])
    assert quick.max_rss_kb is None and quick.cpu_time < 0.05


def stop(p: Process, grace: float) -> None:
    """What the supervisor does: begin the stop, then tick until the program is gone."""
    p.begin_stop(grace)
    while not p.exited.wait(0.05):
        p.tick()


def test_stop_sigterm_then_sigkill(tmp_path, reaper):
    polite = process(tmp_path, ["sleep", "60"])
    polite.start(reaper)
    stop(polite, 5)
    assert polite.stopped_with == "SIGTERM" and polite.exit.signal == "SIGTERM"
    stubborn = process(tmp_path, ["sh", "-c", "trap '' TERM; touch ready; sleep 60"])
    stubborn.start(reaper)
    wait_until(lambda: (tmp_path / "ready").exists(), 10, message="trap set")
    stubborn.begin_stop(0.5)
    assert not stubborn.exited.wait(0.3)  # SIGTERM ignored; the grace is not over
    stop(stubborn, 0.5)
    assert stubborn.stopped_with == "SIGKILL" and stubborn.exit.signal == "SIGKILL"
    assert not stubborn.signal_group(0)  # nothing left to signal


def test_a_more_urgent_stop_cuts_the_grace_short(tmp_path, reaper):
    p = process(tmp_path, ["sh", "-c", "trap '' TERM; touch ready2; sleep 60"])
    p.start(reaper)
    wait_until(lambda: (tmp_path / "ready2").exists(), 10, message="trap set")
    p.begin_stop(60)
    assert p.stopping and p.stopped_with == "SIGTERM"
    p.begin_stop(0)  # e.g. a forced core stop
    assert p.exited.wait(10) and p.stopped_with == "SIGKILL"


def test_group_rss_counts_children(tmp_path, reaper):
    code = textwrap.dedent("""
        import os, sys, time
        if os.fork() == 0:
            hold = bytearray(40 * 1024 * 1024)
            for i in range(0, len(hold), 4096):
                hold[i] = 1
            open("child-ready", "w").close()
            time.sleep(60)
        time.sleep(60)
    """)
    p = process(tmp_path, [sys.executable, "-c", code])
    p.start(reaper)
    try:
        wait_until(lambda: (tmp_path / "child-ready").exists(), 20, message="child ready")
        assert p.rss_kb() >= 40 * 1024
        assert group_rss_kb(p.pid) == pytest.approx(p.rss_kb(), rel=0.2)
    finally:
        stop(p, 0)
    assert p.rss_kb() == 0


def test_orphans_are_killed_and_reaped(tmp_path):
    """A leader that leaves a child behind: the child is killed with the group and, the
    process being a subreaper, reaped (no zombie). Run in a process of its own."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from soaf.process.reaper import Reaper, become_subreaper
        from soaf.process.spawn import Process
        assert become_subreaper()
        reaper = Reaper()
        tmp = Path({str(tmp_path)!r})
        p = Process(["sh", "-c", "trap '' TERM; sleep 300 & echo $! > child.pid"], cwd=tmp,
                    env=dict(os.environ), stdout=tmp / "o", stderr=tmp / "e")
        p.start(reaper)
        assert p.exited.wait(10)
        child = int((tmp / "child.pid").read_text())
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{{child}}") and time.monotonic() < deadline:
            time.sleep(0.05)
        print(child, os.path.exists(f"/proc/{{child}}"), reaper.orphans_reaped)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    _child, exists, reaped = out.stdout.split()
    assert exists == "False" and int(reaped) >= 1


def test_reaper_follows_many_children(tmp_path, reaper):
    procs = [process(tmp_path, ["sh", "-c", f"exit {i % 5}"]) for i in range(50)]
    for p in procs:
        p.start(reaper)
    for i, p in enumerate(procs):
        assert p.exited.wait(30)
        assert p.exit.exit_code == i % 5


def test_open_files_limit_is_raised_to_the_hard_limit():
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from soaf.process.reaper import raise_open_files_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        raise_open_files_limit()
        want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == want)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "True", out.stderr


def test_the_reaper_outlives_running_out_of_file_descriptors(tmp_path):
    """A program watched while the process has no file descriptor left (no pidfd can be
    opened): the reaper logs it and goes on, and reports the exit once descriptors are
    free again. Run in a process of its own, which really exhausts its descriptors."""
    script = textwrap.dedent(f"""
        import os, resource, subprocess, sys, threading
        sys.path.insert(0, {str(ROOT)!r})
        from soaf.process.reaper import Reaper
        reaper = Reaper()
        child = subprocess.Popen(["sleep", "0.3"], start_new_session=True)
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        done = threading.Event()
        reaper.watch(child.pid, lambda pid, status, usage: done.set())
        missed = not done.wait(1.5)  # no pidfd: not watched yet, and the thread lives
        for fd in held:
            os.close(fd)
        print(missed, done.wait(10), reaper._thread.is_alive())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["True", "True", "True"], out.stderr
    assert "reaper: a round failed" in out.stderr


def test_groups_are_swept_only_when_a_child_waits_to_be_reaped(tmp_path):
    """A sweep over every running group costs a system call per group: none is made while
    no child of the core has exited; an orphan that exits inside a running group is
    still reaped. Run in a process of its own (a subreaper, no other children)."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from soaf.process.reaper import Reaper, become_subreaper
        from soaf.process.spawn import Process
        assert become_subreaper()
        reaper = Reaper()
        swept = []
        real = reaper._sweep_live
        reaper._sweep_live = lambda pgid: swept.append(pgid) or real(pgid)
        tmp = Path({str(tmp_path)!r})
        quiet = Process(["sleep", "30"], cwd=tmp, env=dict(os.environ), stdout=tmp / "o",
                        stderr=tmp / "e")
        quiet.start(reaper)
        time.sleep(2.5)  # two sweep intervals with nothing to reap
        before = len(swept)
        leaving = Process(["sh", "-c", "sh -c 'sleep 0.2 &'; sleep 30"], cwd=tmp,
                          env=dict(os.environ), stdout=tmp / "o2", stderr=tmp / "e2")
        leaving.start(reaper)
        deadline = time.monotonic() + 10
        while reaper.orphans_reaped < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        print(before, reaper.orphans_reaped)
        for p in (quiet, leaving):
            os.killpg(p.pid, 9)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    before, reaped = map(int, out.stdout.split())
    assert before == 0 and reaped >= 1
