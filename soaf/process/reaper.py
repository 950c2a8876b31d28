"""Reaping: one thread that collects every program's exit, and what its group leaves behind.

One ``Reaper`` thread waits for every child through pidfds, so an exit is recorded the
moment it happens, with its resource usage. The core is made a child subreaper, so a
program's orphaned children become the core's children; the reaper kills what is left of
a group when its leader exits and reaps those orphans too, so no process and no zombie
outlives a service.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import selectors
import signal
import threading
import time
from collections.abc import Callable

from soaf.process.lineage import LineageSweeper

log = logging.getLogger(__name__)

#: Seconds between two sweeps for orphaned, exited members of running programs' groups.
SWEEP_INTERVAL = 1.0
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux); False if refused.

    Without it, a program's forked children that outlive their parent are re-parented to
    PID 1, which in a container often never reaps them (they stay zombies).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def raise_open_files_limit() -> None:
    """Each running service holds a pidfd and a few files: use the hard limit on open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.debug("cannot raise the open files limit: %s", e)


ExitCallback = Callable[[int, int, "resource.struct_rusage | None"], None]


#: Seconds the reaper waits for a dead leader's SIGKILLed group members to be reapable.
GROUP_REAP_WAIT = 0.2
#: Seconds between two log lines of a failing reaper round.
ERROR_LOG_INTERVAL = 60.0


class Reaper:
    """One thread that reaps every child it is told about (through pidfds), and the
    orphans left in their process groups."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: list[tuple[int, ExitCallback]] = []
        self._live: set[int] = set()  # groups whose leader runs
        self._dead: dict[int, float] = {}  # groups whose leader exited -> when
        self._stopping = False
        self.orphans_reaped = 0
        self._thread = threading.Thread(target=self._run, name="soaf-reaper", daemon=True)
        self._thread.start()
        #: Ends what finished programs left outside their groups (soaf.process.lineage).
        self.lineages = LineageSweeper(self.children)

    def watch(self, pid: int, callback: ExitCallback) -> None:
        """Call ``callback(pid, status, rusage)`` from the reaper thread when ``pid`` exits.

        ``pid`` must lead its own process group (``start_new_session``)."""
        with self._lock:
            self._pending.append((pid, callback))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def children(self) -> set[int]:
        """The pids this reaper was told about and has not reaped yet (running programs'
        leaders, or ones about to be watched)."""
        with self._lock:
            pending = {pid for pid, _ in self._pending}
        for _ in range(3):  # the reaper thread may change the set while it is copied
            try:
                return set(self._live) | pending
            except RuntimeError:
                continue
        return pending | set(list(self._live))

    def close(self) -> None:
        self.lineages.close()
        self._stopping = True
        self._wake()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        """Reap until closed. An error of one round (no file descriptor left for a pidfd,
        say) is logged at most once a minute and the next round goes on: a reaper that
        died would leave every later program's end unnoticed."""
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        logged = -ERROR_LOG_INTERVAL
        while not self._stopping:
            try:
                next_sweep = self._round(next_sweep)
            except Exception:
                if time.monotonic() - logged >= ERROR_LOG_INTERVAL:
                    logged = time.monotonic()
                    log.exception("reaper: a round failed; going on (logged at most once a "
                                  "minute)")
                time.sleep(0.1)

    def _round(self, next_sweep: float) -> float:
        """One round: reap what exited, start watching what was added, sweep groups."""
        timeout = 0.1 if self._dead or self._pending else SWEEP_INTERVAL
        for key, _ in self._selector.select(timeout=timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                continue
            pid, callback = key.data
            if self._reap(pid, callback):
                self._selector.unregister(key.fd)
                os.close(key.fd)
        with self._lock:
            pending, self._pending = self._pending, []
        for i, (pid, callback) in enumerate(pending):
            self._live.add(pid)
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._reap(pid, callback, block=True)
                continue
            except OSError:  # out of file descriptors: watched from the next round
                with self._lock:
                    self._pending[:0] = pending[i:]
                raise
            self._selector.register(fd, selectors.EVENT_READ, (pid, callback))
        for pgid in list(self._dead):
            self._sweep_dead(pgid)
        if time.monotonic() >= next_sweep:
            next_sweep = time.monotonic() + SWEEP_INTERVAL
            if self._zombie_child():
                for pgid in list(self._live):
                    self._sweep_live(pgid)
        return next_sweep

    @staticmethod
    def _zombie_child() -> bool:
        """Whether any child of this process has exited and waits to be reaped: one
        system call, so a sweep over every running program's group is made only when
        it can find something."""
        try:
            return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return False

    def _reap(self, pid: int, callback: ExitCallback, *, block: bool = False) -> bool:
        try:
            got, status, usage = os.wait4(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            got, status, usage = pid, 0, None
        if got == 0:
            return False
        # Whatever the leader left behind in its group goes with it: no stray processes.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self._live.discard(pid)
        self._dead[pid] = time.monotonic()
        # Reap the group's killed members now (a shimmed program is the leader's child),
        # so none is left as a zombie once the exit is reported; stragglers are swept later.
        until = time.monotonic() + GROUP_REAP_WAIT
        while pid in self._dead and time.monotonic() < until:
            self._sweep_dead(pid)
            if pid in self._dead:
                time.sleep(0.002)
        try:
            callback(pid, status, usage)
        except Exception:
            log.exception("exit callback for pid %d failed", pid)
        return True

    def _sweep_dead(self, pgid: int) -> None:
        """Reap the killed members of a group whose leader is gone, until none is left."""
        while True:
            try:
                info = os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                del self._dead[pgid]  # no child of ours left in that group
                return
            if info is None:
                if time.monotonic() - self._dead[pgid] > 60:
                    log.warning("process group %d still has members a minute after SIGKILL", pgid)
                    del self._dead[pgid]
                return
            self.orphans_reaped += 1

    def _sweep_live(self, pgid: int) -> None:
        """Reap exited orphans inside a running program's group, never its leader."""
        while True:
            try:
                info = os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == pgid:
                return  # the leader's exit is the pidfd's business
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)
                self.orphans_reaped += 1
