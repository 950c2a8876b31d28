"""A running program this core did not spawn: one a killed core of this node left running.

It is not this core's child, so it is watched through a pidfd (its exit status, which only
a parent learns, is read from the exit file its spawner, soaf.process.spawnserver, or its
shim, soaf.process.shim, writes; the spawner's tells its CPU time and peak memory too), and
stopped the
same way as a spawned program (soaf.process.stop), only ever after verifying pid and
start time (soaf.process.identity).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from soaf.process import shim
from soaf.process.identity import ProcIdentity, pidfd_for, signaller, stop_group
from soaf.process.latch import Latch
from soaf.process.spawn import Exit, group_rss_kb
from soaf.process.stop import GroupStop, GroupStopping

log = logging.getLogger(__name__)

#: Seconds to wait for the spawner to write the exit file of a program that has ended.
EXIT_FILE_WAIT = 2.0


class AdoptedProcess(GroupStopping):
    """A running program this core did not spawn, watched until it exits."""

    def __init__(self, identity: ProcIdentity, *, exit_file: Path | None,
                 running_at: float | None) -> None:
        self.identity = identity
        self.pid = identity.pid
        self.exit_file = exit_file
        self.running_at = running_at or time.time()
        self.exit: Exit | None = None  # None after the exit: its status is unknown
        self.exited = Latch()
        self.argv: list[str] = []
        self._on_exit: list[Callable[[Exit | None], None]] = []
        self._stop = GroupStop.of(self, "adopted pid")

    def on_exit(self, callback: Callable[[Exit | None], None]) -> None:
        self._on_exit.append(callback)

    def start(self) -> None:
        threading.Thread(target=self._watch, name=f"soaf-adopted-{self.pid}", daemon=True).start()

    def _watch(self) -> None:
        fd = pidfd_for(self.identity)
        if fd is not None:
            try:
                select.select([fd], [], [])  # a pidfd turns readable when the process exits
            finally:
                os.close(fd)
        # Whatever the leader left in its group goes with it, as for a core's own child.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.identity.pgid, signal.SIGKILL)
        # (its spawner, if alive, writes the file a moment after reaping it)
        ended = shim.wait_exit(self.exit_file, EXIT_FILE_WAIT) if self.exit_file else None
        if ended is not None:
            code, cpu, rss = ended
            self.exit = Exit(returncode=code, wall_time=time.time() - self.running_at,
                             cpu_time=cpu or 0.0, max_rss_kb=rss or 0, usage_known=cpu is not None)
        else:
            log.warning("adopted pid %d ended; no exit status in %s", self.pid, self.exit_file)
        self.exited.set()
        callbacks, self._on_exit = self._on_exit, []  # once, then dropped (see Process)
        for callback in callbacks:
            try:
                callback(self.exit)
            except Exception:
                log.exception("on_exit callback failed for adopted pid %d", self.pid)

    def signal_group(self, sig: int) -> bool:
        """Signal the program's group if it is still verifiably the same process."""
        if self.exited.is_set() or not self.identity.alive():
            return False
        return signaller(self.identity)(sig)

    def stop(self, grace: float) -> None:
        """Stop the program and wait for its end (a blocking stop)."""
        if not self.exited.is_set():
            stop_group(self.identity, grace)
        self.exited.wait(grace + 5)

    def rss_kb(self) -> int:
        """Resident memory of the program and its descendants now, in KiB."""
        if self.exited.is_set() or not self.identity.alive():
            return 0
        return group_rss_kb(self.pid)
