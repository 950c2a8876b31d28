"""Reaping: one thread that collects every program's exit, and what its group leaves behind.

One ``Reaper`` thread learns every program's exit the moment it happens, with its resource
usage: from the core's spawner (soaf.process.spawner), which is the parent of the programs
it spawned, reaps them and their orphans, and sends their exits; and through pidfds for
the core's own children (programs spawned under the shim when there is no spawner). The
core is made a child subreaper, so a program's orphaned children become the core's
children; the reaper kills what is left of a group when its leader exits and reaps those
orphans too, so no process and no zombie outlives a service. Should the spawner die, its
programs become the core's children too: the reaper watches them through pidfds from
then on (an exit the spawner reaped but could not send is read from the exit file), and
starts a new spawner.
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
from pathlib import Path

from soaf.process import shim
from soaf.process.lineage import LineageSweeper
from soaf.process.spawner import Spawner

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

    def __init__(self, spawners: Callable[[], Spawner | None] | None = None) -> None:
        """``spawners``: starts a spawner (now, and again should one die); None: none."""
        self._spawners = spawners
        #: The spawner programs are spawned by (None: the core spawns them itself).
        self.spawner = spawners() if spawners is not None else None
        self._spawned: dict[int, tuple[ExitCallback, Path | None]] = {}
        self._early: dict[int, tuple[int, resource.struct_rusage]] = {}
        self._ready: list[tuple[int, ExitCallback, tuple[int, resource.struct_rusage]]] = []
        self._exit_files: dict[int, Path] = {}
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        if self.spawner is not None:
            self._selector.register(self.spawner.events, selectors.EVENT_READ, self.spawner)
        self._pending: list[tuple[int, ExitCallback]] = []
        self._live: set[int] = set()  # groups whose leader runs
        self._dead: dict[int, float] = {}  # groups whose leader exited -> when
        self._stopping = False
        self.orphans_reaped = 0
        self._thread = threading.Thread(target=self._run, name="soaf-reaper", daemon=True)
        self._thread.start()
        #: Ends what finished programs left outside their groups (soaf.process.lineage).
        self.lineages = LineageSweeper(self.children, parents=self._parents)

    @classmethod
    def with_spawner(cls) -> Reaper:
        """A reaper whose programs are spawned by a spawner (soaf.process.spawner), which
        outlives a killed core; under the shim when no spawner can be started."""
        return cls(spawners=Spawner.start)

    def watch(self, pid: int, callback: ExitCallback) -> None:
        """Call ``callback(pid, status, rusage)`` from the reaper thread when ``pid`` exits.

        ``pid`` must lead its own process group (``start_new_session``)."""
        with self._lock:
            self._pending.append((pid, callback))
        self._wake()

    def watch_spawned(self, pid: int, callback: ExitCallback, exit_file: Path | None,
                      spawner: Spawner) -> None:
        """Call ``callback(pid, status, rusage)`` from the reaper thread when ``spawner``
        reports that ``pid`` exited (or, should the spawner be gone, when the core reaps
        it, or finds its end in ``exit_file``)."""
        with self._lock:
            early = self._early.pop(pid, None)
            if early is not None:
                self._ready.append((pid, callback, early))
            elif spawner is self.spawner:
                self._spawned[pid] = (callback, exit_file)
                return
            else:  # that spawner died meanwhile: the program is the core's child now
                if exit_file is not None:
                    self._exit_files[pid] = exit_file
                self._pending.append((pid, callback))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def children(self) -> set[int]:
        """The pids this reaper was told about and has not reaped yet (running programs'
        leaders, or ones about to be watched)."""
        with self._lock:
            pending = {pid for pid, _ in self._pending} | set(self._spawned)
        for _ in range(3):  # the reaper thread may change the set while it is copied
            try:
                return set(self._live) | pending
            except RuntimeError:
                continue
        return pending | set(list(self._live))

    def _parents(self) -> list[int]:
        """Where a program's orphans go: to the core, and to its spawner."""
        spawner = self.spawner
        return [os.getpid()] if spawner is None else [os.getpid(), spawner.pid]

    def close(self) -> None:
        self.lineages.close()
        self._stopping = True
        self._wake()
        self._thread.join(timeout=2)
        spawner, self.spawner = self.spawner, None
        if spawner is not None:
            spawner.close()

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
            if isinstance(key.data, Spawner):
                self._spawner_event(key.data)
                continue
            pid, callback = key.data
            if self._reap(pid, callback):
                self._selector.unregister(key.fd)
                os.close(key.fd)
        with self._lock:
            pending, self._pending = self._pending, []
            ready, self._ready = self._ready, []
        for pid, callback, (status, usage) in ready:
            self._call(callback, pid, status, usage)
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
            exit_file = self._exit_files.pop(pid, None)
            ended = shim.read_exit_usage(exit_file) if exit_file is not None else None
            if ended is not None:  # a dead spawner reaped it; its exit file says how
                status, usage = _as_status(ended[0]), _rusage(ended[1] or 0.0, 0.0, ended[2] or 0)
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
        self._exit_files.pop(pid, None)
        self._call(callback, pid, status, usage)
        return True

    @staticmethod
    def _call(callback: ExitCallback, pid: int, status: int,
              usage: resource.struct_rusage | None) -> None:
        try:
            callback(pid, status, usage)
        except Exception:
            log.exception("exit callback for pid %d failed", pid)

    def _spawner_event(self, spawner: Spawner) -> None:
        """Messages from the spawner: programs' exits, or (none) its end."""
        events = spawner.read_events()
        if events is None:
            self._spawner_died(spawner)
            return
        for event in events:
            pid, status = int(event["pid"]), int(event["status"])
            usage = _rusage(float(event["utime"]), float(event["stime"]), int(event["maxrss"]))
            with self._lock:
                watched = self._spawned.pop(pid, None)
                if watched is None:  # its spawn has not been answered yet
                    self._early[pid] = (status, usage)
                    continue
            self._call(watched[0], pid, status, usage)

    def _spawner_died(self, spawner: Spawner) -> None:
        """The spawner is gone: its programs are the core's children now; a new one."""
        self._selector.unregister(spawner.events)
        with self._lock:
            if self.spawner is spawner:
                self.spawner = None
        spawner.close(wait=5.0)  # reaped: its children have been handed to the core
        if self._stopping:
            return
        log.warning("the spawner (pid %d) ended; its programs are watched by the core",
                    spawner.pid)
        with self._lock:
            moved, self._spawned = self._spawned, {}
            for pid, (callback, exit_file) in moved.items():
                if exit_file is not None:
                    self._exit_files[pid] = exit_file
                self._pending.append((pid, callback))
        new = self._spawners() if self._spawners is not None else None
        if new is not None:
            self._selector.register(new.events, selectors.EVENT_READ, new)
            with self._lock:
                self.spawner = new

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


def _rusage(utime: float, stime: float, maxrss: int) -> resource.struct_rusage:
    """A rusage as ``wait4`` gives it, from what the spawner sent (or the exit file kept)."""
    return resource.struct_rusage((utime, stime, maxrss) + (0,) * 13)


def _as_status(returncode: int) -> int:
    """A wait status for ``returncode`` (negative: killed by that signal)."""
    return -returncode if returncode < 0 else (returncode & 0xFF) << 8
