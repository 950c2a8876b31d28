"""The table of the services a core runs now: reported by the heartbeat, cancelled through
by the control listener, counted by the intake loop (it reads only while slots are free)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from soaf.protocol.replies import Entry
from soaf.run.service_run import ServiceRun

log = logging.getLogger(__name__)


class RunTable:
    """The services this core runs now, and those whose final state is not in Redis yet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, ServiceRun] = {}
        #: Runs that have ended but whose final state is not in Redis yet, by entry id.
        self._finishing: dict[str, ServiceRun] = {}
        #: Set whenever a run ends (a slot is free).
        self.slot_freed = threading.Event()

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)

    def current(self) -> list[ServiceRun]:
        with self._lock:
            return list(self._runs.values())

    def get(self, service_id: str) -> ServiceRun | None:
        with self._lock:
            return self._runs.get(service_id)

    def add(self, run: ServiceRun) -> None:
        with self._lock:
            self._runs[run.service_id] = run

    def done(self, run: ServiceRun) -> None:
        """A run is over (its thread is about to end)."""
        with self._lock:
            self._runs.pop(run.service_id, None)
            finishing = run.final_queued and not run.final_written.is_set()
            if finishing:
                self._finishing[run.claim.entry_id] = run
        if finishing:  # (outside the lock: the listener runs at once if it is written now)
            run.on_final_written.add(self._written, run)
        self.slot_freed.set()

    def _written(self, run: ServiceRun) -> None:
        """``run``'s final state is in Redis: its entry is no longer held here."""
        with self._lock:
            if self._finishing.get(run.claim.entry_id) is run:
                del self._finishing[run.claim.entry_id]

    def entries(self) -> set[str]:
        """Stream entries this core holds: running, or ended with the final not yet written
        (those must not run again)."""
        with self._lock:
            return {run.claim.entry_id for run in self._runs.values()} | set(self._finishing)

    def not_held(self, entries: list[Entry]) -> list[Entry]:
        """``entries`` less those this core holds. A failover can lose the record of a
        delivery, and the new master then delivers an entry again while it runs here."""
        mine = self.entries()
        return [entry for entry in entries if entry[0] not in mine]

    def work_dirs(self) -> set[Path]:
        with self._lock:
            return {run.work_dir for run in self._runs.values() if run.work_dir is not None}

    def cancel(self, service_id: str) -> bool:
        """Cancel a service running here; False if it does not run here."""
        run = self.get(service_id)
        if run is None:
            return False
        if not run.cancel_requested:
            log.info("cancelling service %s", service_id)
        run.cancel()
        return True
