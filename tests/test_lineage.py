"""A run's lineage in this process: the shared census of the core's descendants."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from soaf.process import census as census_mod
from soaf.process.census import RUN_VAR, handed_out
from soaf.process.identity import read_stat
from soaf.process.lineage import RunLineage, new_token

SLEEPER = "print(flush=True); import time; time.sleep(60)"


def spawn(token: str | None = None) -> subprocess.Popen:
    """A sleeping child, returned once it runs (its exec over: its environment is set)."""
    env = dict(os.environ)
    if token is not None:
        env[RUN_VAR] = token
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"\n"
    return proc


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_forced_observe_takes_a_new_look_and_each_look_is_picked_up_once():
    lineage = RunLineage(new_token("svc", 1))
    lineage.observe(force=True)  # a look before the process exists
    proc = spawn(lineage.token)
    try:
        assert proc.pid in lineage.observe(force=True)
        stat = read_stat(proc.pid)
        assert stat is not None and lineage.seen[proc.pid] == stat.start_time
        assert lineage.observe() == []  # this run has that look already
    finally:
        stop(proc)


def test_a_look_reads_only_the_processes_new_since_the_last(monkeypatch):
    others = [spawn() for _ in range(10)]  # descendants without a token
    try:
        lineage = RunLineage(new_token("svc", 1))
        lineage.observe(force=True)
        reads: list[int] = []
        real = census_mod.read_stat
        monkeypatch.setattr(census_mod, "read_stat", lambda pid: reads.append(pid) or real(pid))
        proc = spawn(lineage.token)
        try:
            assert proc.pid in lineage.observe(force=True)
            assert proc.pid in reads
            assert not set(reads) & {p.pid for p in others}
        finally:
            stop(proc)
    finally:
        stop(*others)


def hand_out_next(pid: int) -> None:
    """Make ``pid`` the next pid the kernel hands out (needs CAP_SYS_ADMIN)."""
    try:
        with open("/proc/sys/kernel/ns_last_pid", "w") as last:
            last.write(str(pid - 1))
    except OSError as exc:
        pytest.skip(f"cannot choose the next pid here: {exc}")


def test_a_pid_handed_out_again_between_two_looks_is_read_again():
    lineage = RunLineage(new_token("svc", 1))
    for _ in range(20):  # (another fork on the machine may take the pid first: try again)
        other = spawn()  # not this run's
        hand_out_next(other.pid)  # the kernel's cursor, gone round, is just below its pid
        assert other.pid not in lineage.observe(force=True)
        stop(other)
        proc = spawn(lineage.token)  # its pid, handed out again: a process of this run
        try:
            if proc.pid == other.pid:
                assert proc.pid in lineage.observe(force=True)
                return
        finally:
            stop(proc)
    pytest.fail("the kernel never handed the same pid out again")


def test_a_process_whose_environment_read_empty_is_read_again_at_the_next_look():
    # Between fork and the end of exec, /proc shows no environment: here a process with
    # none at first, that then execs itself with the run's token.
    lineage = RunLineage(new_token("svc", 1))
    code = ("import os, sys; print(flush=True); token = sys.stdin.readline().strip(); "
            f"os.execve(sys.executable, [sys.executable, '-c', {SLEEPER!r}], "
            f"{{{RUN_VAR!r}: token}})")
    proc = subprocess.Popen([sys.executable, "-c", code], env={}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"\n"
        assert proc.pid not in lineage.observe(force=True)  # no environment: no token
        proc.stdin.write(lineage.token.encode() + b"\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"\n"  # the same process, with the token now
        assert proc.pid in lineage.observe(force=True)
    finally:
        stop(proc)


def test_the_pids_handed_out_between_two_marks_wrap_at_the_top_of_the_range():
    assert handed_out(100, 103) == (range(101, 104),)
    assert handed_out(7, 7) == (range(8, 8),)  # none
    high, low = handed_out(32760, 5)
    assert 32767 in high and 32760 not in high and 5 in low and 6 not in low


def test_a_process_seen_alive_is_reaped_by_end_once_it_exited():
    lineage = RunLineage(new_token("svc", 1))
    proc = spawn(lineage.token)
    try:
        assert proc.pid in lineage.observe(force=True)
    finally:
        proc.kill()  # a zombie now: its environment can no longer be read
    lineage.end(wait=5)
    assert not Path(f"/proc/{proc.pid}").exists()
    proc.wait()  # (already reaped: returns at once)
