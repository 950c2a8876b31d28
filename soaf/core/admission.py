"""Admission by resources: which services a core starts now, which wait on it for CPUs
or memory to free up, and which it can never run.

A service that declares no ``cpus`` or ``memory_mb`` (soaf.run.policy ``needs_for``)
counts only against the core's service slots and never meets this module. One that
declares them is started only while they fit in what the core's capacity
(``Settings.cpus``, ``Settings.memory_mb``) has left; otherwise its entry waits in the
core, read but not claimed (its record stays ``queued``, with a ``waiting_for`` note),
and takes a service slot. Waiting entries start in arrival order as runs end: a waiting
service holds back later ones that declare needs (so a big one is never starved by a
stream of small ones), never those that declare none. Runs a core already owns (resumed
or re-run by recovery) always hold what they need, even past the capacity.

Entries of a service at its fleet-wide ``max_concurrent`` are *parked* here the same way
(read, not claimed, a service slot each); the launcher tries their slots again.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from soaf.plugin.loader import Registry
from soaf.protocol.template import ServiceParamTemplate
from soaf.run.policy import Needs

#: Share of the machine's RAM a core offers when ``--memory-mb`` is not given.
DEFAULT_MEMORY_SHARE = 0.9
#: Slack in comparisons, so 0.1 + 0.2 CPUs fit in 0.3.
_EPSILON = 1e-9


def machine_capacity() -> tuple[float, float]:
    """This machine's usable CPUs and ~90% of its RAM (MiB)."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (AttributeError, OSError, ValueError):
        ram = 1024.0
    return cpus, float(int(ram * DEFAULT_MEMORY_SHARE))


def _cpus(value: float) -> str:
    return f"{value:g} CPU{'' if value == 1 else 's'}"


@dataclass
class Waiting:
    """An entry read by this core whose service waits for its needs to be free."""

    entry_id: str
    template: ServiceParamTemplate
    registry: Registry
    needs: Needs


class Admission:
    """A core's capacity, what its runs hold of it, and the entries waiting for it."""

    def __init__(self, *, cpus: float | None, memory_mb: float | None, node: str) -> None:
        machine_cpus, machine_memory = machine_capacity()
        self.cpus = float(cpus) if cpus is not None else machine_cpus
        self.memory_mb = float(memory_mb) if memory_mb is not None else machine_memory
        self.node = node
        self._lock = threading.Lock()
        self._held: dict[str, Needs] = {}  # by stream entry id
        self._used_cpus = 0.0
        self._used_memory = 0.0
        self._waiting: dict[str, Waiting] = {}  # by entry id, in arrival order
        self._parked: dict[str, Waiting] = {}  # waiting for a fleet slot, by entry id

    # -- holding --------------------------------------------------------------------------

    def _fits(self, needs: Needs) -> bool:
        return (self._used_cpus + needs.cpus <= self.cpus + _EPSILON
                and self._used_memory + needs.memory_mb <= self.memory_mb + _EPSILON)

    def _hold(self, entry_id: str, needs: Needs) -> None:
        old = self._held.pop(entry_id, None)
        if old is not None:
            self._used_cpus -= old.cpus
            self._used_memory -= old.memory_mb
        self._held[entry_id] = needs
        self._used_cpus += needs.cpus
        self._used_memory += needs.memory_mb

    def hold(self, entry_id: str, needs: Needs) -> None:
        """The run of ``entry_id`` holds ``needs`` here, whether they fit or not."""
        with self._lock:
            self._hold(entry_id, needs)

    def try_hold(self, entry_id: str, needs: Needs) -> bool:
        """Hold ``needs`` for ``entry_id`` if they fit now and nothing waits before it."""
        with self._lock:
            if self._waiting or not self._fits(needs):
                return False
            self._hold(entry_id, needs)
            return True

    def release(self, entry_id: str) -> None:
        with self._lock:
            old = self._held.pop(entry_id, None)
            if old is not None:
                self._used_cpus = max(0.0, self._used_cpus - old.cpus)
                self._used_memory = max(0.0, self._used_memory - old.memory_mb)

    def never_fits(self, needs: Needs) -> str | None:
        """Why ``needs`` exceed this core's whole capacity, or None."""
        if needs.cpus > self.cpus + _EPSILON:
            return f"needs {_cpus(needs.cpus)}; {self.node} offers {self.cpus:g}"
        if needs.memory_mb > self.memory_mb + _EPSILON:
            return f"needs {needs.memory_mb:g} MiB; {self.node} offers {self.memory_mb:g}"
        return None

    # -- waiting --------------------------------------------------------------------------

    def wait(self, waiting: Waiting) -> str:
        """Keep ``waiting`` until its needs fit; returns the note for its record."""
        with self._lock:
            self._waiting[waiting.entry_id] = waiting
            free_cpus = max(0.0, self.cpus - self._used_cpus)
            free_memory = max(0.0, self.memory_mb - self._used_memory)
        needs = waiting.needs
        free = []
        if needs.cpus:
            free.append(f"{free_cpus:g}")
        if needs.memory_mb:
            free.append(f"{free_memory:g} MiB")
        return f"{needs.describe()} ({', '.join(free)} free on {self.node})"

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._parked)

    def waiting_entries(self) -> set[str]:
        with self._lock:
            return set(self._waiting) | set(self._parked)

    def park(self, waiting: Waiting) -> None:
        """Keep ``waiting`` until its service has a free fleet slot (``max_concurrent``)."""
        with self._lock:
            self._parked[waiting.entry_id] = waiting

    def parked(self) -> list[Waiting]:
        with self._lock:
            return list(self._parked.values())

    def unpark(self, entry_id: str) -> None:
        with self._lock:
            self._parked.pop(entry_id, None)

    def take_ready(self) -> list[Waiting]:
        """The waiting entries that fit now, in arrival order up to the first that does
        not, each holding its needs."""
        ready: list[Waiting] = []
        with self._lock:
            for entry_id, waiting in list(self._waiting.items()):
                if not self._fits(waiting.needs):
                    break
                self._hold(entry_id, waiting.needs)
                del self._waiting[entry_id]
                ready.append(waiting)
        return ready

    # -- reporting ------------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """The core's capacity, what its runs hold, and how many entries wait."""
        with self._lock:
            return {"cpus": self.cpus, "cpus_used": round(self._used_cpus, 6),
                    "memory_mb": self.memory_mb, "memory_mb_used": round(self._used_memory, 3),
                    "waiting": len(self._waiting) + len(self._parked)}
