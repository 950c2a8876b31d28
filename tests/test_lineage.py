"""A run's lineage in this process: the shared census of the core's descendants."""

import os
import subprocess
import sys
from pathlib import Path

from soaf.process import lineage as lineage_mod
from soaf.process.identity import read_stat
from soaf.process.lineage import RUN_VAR, RunLineage, new_token


def spawn(token: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if token is not None:
        env[RUN_VAR] = token
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)


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
        real = lineage_mod.read_stat
        monkeypatch.setattr(lineage_mod, "read_stat", lambda pid: reads.append(pid) or real(pid))
        proc = spawn(lineage.token)
        try:
            assert proc.pid in lineage.observe(force=True)
            assert proc.pid in reads
            assert not set(reads) & {p.pid for p in others}
        finally:
            stop(proc)
    finally:
        stop(*others)


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
