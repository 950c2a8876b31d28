"""A core keeps its own threads on one CPU and gives its programs every CPU
(soaf.core.cpuhome, soaf.process.affinity); ``--core-cpu off`` leaves them spread."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from soaf import ServiceParamTemplate
from soaf.process.lineage import direct_children
from tests.conftest import wait_until

CPUS = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs a machine with two CPUs or more")


def thread_cpus(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets of ``pid``'s threads."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found.add(frozenset(os.sched_getaffinity(int(tid))))
        except OSError:  # ended meanwhile
            continue
    return found


def program_cpus(client) -> frozenset[int]:
    """The CPUs a program of the core was allowed, as it printed them."""
    sid = client.submit(ServiceParamTemplate("cpus"))
    record = client.wait(sid, timeout=30)
    assert record.ok, record.error
    (line,) = (Path(str(record.get("work_dir"))) / "stdout.log").read_text().splitlines()
    listed = line.split(":", 1)[1].strip()
    cpus: set[int] = set()
    for part in listed.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return frozenset(cpus)


def test_core_threads_share_one_cpu_and_its_programs_get_all(start_core, client):
    core = start_core()
    wait_until(lambda: "threads run on CPU" in core.log(), 10, message="the CPU home")
    assert len(thread_cpus(core.proc.pid)) == 1
    (home,) = thread_cpus(core.proc.pid)
    assert len(home) == 1 and home <= CPUS
    # Threads started later (one per running service) are on it too.
    assert program_cpus(client) == CPUS  # the program was not held to the core's CPU
    assert thread_cpus(core.proc.pid) == {home}
    spawners = direct_children(core.proc.pid)
    assert spawners and all(frozenset(os.sched_getaffinity(pid)) == CPUS for pid in spawners)
    # A spawner started later, from a thread on the core's CPU, still gets every CPU.
    for pid in spawners:
        os.kill(pid, signal.SIGKILL)
    assert program_cpus(client) == CPUS
    again = direct_children(core.proc.pid) - spawners
    assert again and all(frozenset(os.sched_getaffinity(pid)) == CPUS for pid in again)


def test_core_cpu_off_leaves_the_threads_to_the_kernel(start_core, client):
    core = start_core(SOAF_CORE_CPU="off")
    assert program_cpus(client) == CPUS
    assert thread_cpus(core.proc.pid) == {CPUS}
    assert "threads run on CPU" not in core.log()


def test_core_cpu_set_to_one_cpu_keeps_it(start_core, client):
    last = max(CPUS)
    core = start_core(args=["--core-cpu", str(last)])
    wait_until(lambda: f"threads run on CPU {last} (as set)" in core.log(), 10,
               message="the CPU home")
    assert program_cpus(client) == CPUS
    assert thread_cpus(core.proc.pid) == {frozenset({last})}
