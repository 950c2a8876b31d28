"""The CPUs a process's threads may run on, and the CPUs the programs it starts get.

A core's threads are many, but CPython lets one of them run Python at a time (the GIL).
Each time a thread makes a system call it lets the GIL go, and another thread waiting for
it takes it. Spread over several CPUs, every such hand-over wakes a thread on another CPU
(an inter-processor interrupt, two context switches), and the core spends a third of its
time in the kernel doing it. The same threads kept on one CPU hand the GIL over without
those wake-ups: measured with bench/throughput.py on 2 CPUs, the core used 27% less CPU
per service and ran 40% more services a second (soaf.core.cpuhome chooses the CPU).

Threads inherit their creator's CPUs, and so do processes: a program started from a
thread of the core would share the core's one CPU. ``spread()`` gives the calling thread
back every CPU the process had before while it starts one, and the spawner
(soaf.process.spawnserver) is started with ``program_cpus()``. Linux only; elsewhere
nothing is pinned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: The CPUs the process had before its threads were given a home (None: no home).
_SPREAD: frozenset[int] | None = None
#: Threads inside ``spread()`` (native ids), which ``home_threads`` leaves alone: a thread
#: moved back home between its ``spread()`` and its start of a process would give that
#: process (a spawner, and so every program) one CPU.
_SPREADING: set[int] = set()
_LOCK = threading.Lock()


def available() -> frozenset[int] | None:
    """The CPUs the calling thread may run on; None where the system cannot say."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def program_cpus() -> frozenset[int] | None:
    """The CPUs a program started by this process should get: all those the process had
    before ``home_threads``; None if its threads have no home (inheriting is right)."""
    return _SPREAD


def home_threads(cpus: frozenset[int]) -> int:
    """Keep every thread of this process on ``cpus``; how many threads were moved. The
    first call notes the CPUs the process had, for ``program_cpus``."""
    global _SPREAD
    if _SPREAD is None:
        _SPREAD = available()
    moved = 0
    with _LOCK:  # (a thread entering spread() meanwhile waits, so it is never moved)
        for tid in _threads():
            if tid in _SPREADING:
                continue
            try:
                if frozenset(os.sched_getaffinity(tid)) != cpus:
                    os.sched_setaffinity(tid, cpus)
                    moved += 1
            except OSError:  # the thread has just ended
                continue
    return moved


@contextlib.contextmanager
def spread() -> Iterator[None]:
    """While the block runs, the calling thread may run on every CPU the process had
    before its threads got a home: a process it starts inherits those."""
    cpus = _SPREAD
    if cpus is None:
        yield
        return
    me = threading.get_native_id()
    with _LOCK:
        _SPREADING.add(me)
        home = available()
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        with _LOCK:
            if home is not None:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, home)
            _SPREADING.discard(me)


def _threads() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
