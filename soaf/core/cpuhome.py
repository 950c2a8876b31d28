"""The one CPU a core's threads share, chosen at start and changed when other work crowds it.

soaf.process.affinity says why one CPU: the threads hand the GIL to one another without
waking other CPUs. The programs the core runs are not held to it (the spawner gets every
CPU the core had). The setting (``--core-cpu``, SOAF_CORE_CPU) is ``auto`` (the default:
the least busy CPU, moved when other processes keep it busier than another one by
``MOVE_MARGIN``), a CPU number (that one, for good), or ``off`` (the kernel spreads the
threads). Only the ``soaf core`` command gives its process a home, never a user's process
that embeds a core. A core allowed a single CPU has nothing to choose.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from soaf.process import affinity

log = logging.getLogger(__name__)

#: Seconds between two looks at how busy each CPU is.
CHECK_INTERVAL = 5.0
#: How much busier (fraction of one CPU) other work must keep the home CPU than the least
#: busy one before the core moves: a margin, so that it does not move back and forth.
MOVE_MARGIN = 0.3
#: Seconds in one clock tick, the unit of /proc/stat.
_TICK_SECONDS = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_times() -> dict[int, tuple[int, int]]:
    """CPU number -> (busy, total) clock ticks since boot, from /proc/stat."""
    found: dict[int, tuple[int, int]] = {}
    try:
        with open("/proc/stat", "rb") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return found
    for line in lines:
        if not line.startswith(b"cpu") or line.startswith(b"cpu "):
            continue
        name, *fields = line.split()
        ticks = [int(f) for f in fields[:8]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        found[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return found


class CpuHome:
    """Keeps this process's threads on one CPU (``start``), looking again every
    ``interval`` seconds when the setting is ``auto``."""

    def __init__(self, setting: str, *, interval: float = CHECK_INTERVAL) -> None:
        self.setting = setting
        self.interval = interval
        self.cpu: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[int, tuple[int, int]] = {}
        self._last_own = 0.0

    def start(self) -> int | None:
        """Choose the CPU and move every thread there; the CPU, or None for none."""
        allowed = affinity.available()
        if self.setting == "off" or allowed is None or len(allowed) < 2:
            return None
        if self.setting != "auto":
            wanted = int(self.setting)
            if wanted not in allowed:
                log.warning("CPU %d is not among the CPUs this core may use (%s); its "
                            "threads are left to the kernel", wanted, _listed(allowed))
                return None
            self._move(wanted, "as set")
            return self.cpu
        self._last, self._last_own = cpu_times(), time.process_time()
        time.sleep(0.1)  # a first look at how busy each CPU is
        self._move(self._idlest(allowed, self._busy(allowed)), "the least busy")
        self._thread = threading.Thread(target=self._loop, name="soaf-cpu-home", daemon=True)
        self._thread.start()
        return self.cpu

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def check(self) -> None:
        """One look: move to a CPU less crowded by others, and keep every thread there
        (a thread that let itself run elsewhere comes back)."""
        allowed = affinity.program_cpus()
        if self.cpu is None or allowed is None:
            return
        busy = self._busy(allowed)
        idlest = self._idlest(allowed, busy)
        if busy.get(self.cpu, 0.0) > busy.get(idlest, 0.0) + MOVE_MARGIN:
            self._move(idlest, "less busy")
        else:
            affinity.home_threads(frozenset({self.cpu}))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:
                log.exception("keeping the core's threads on one CPU failed")

    def _busy(self, allowed: frozenset[int]) -> dict[int, float]:
        """CPU -> the fraction of it others used since the last look (the core's own
        use, all of it on its home, taken off that one)."""
        now, own = cpu_times(), time.process_time()
        busy: dict[int, float] = {}
        for cpu in allowed:
            was, then = self._last.get(cpu, (0, 0)), now.get(cpu)
            if then is None or then[1] <= was[1]:
                continue
            ticks = then[1] - was[1]
            used = (then[0] - was[0]) / ticks
            if cpu == self.cpu:
                used -= (own - self._last_own) / (ticks * _TICK_SECONDS)
            busy[cpu] = max(0.0, used)
        self._last, self._last_own = now, own
        return busy

    @staticmethod
    def _idlest(allowed: frozenset[int], busy: dict[int, float]) -> int:
        return min(sorted(allowed), key=lambda cpu: busy.get(cpu, 1.0))

    def _move(self, cpu: int, why: str) -> None:
        affinity.home_threads(frozenset({cpu}))
        if cpu != self.cpu:
            log.info("the core's threads run on CPU %d (%s)", cpu, why)
        self.cpu = cpu


def _listed(cpus: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus)))

