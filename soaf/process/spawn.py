"""Run one external program: its own session, output to files, stop, reap. No Redis here.

Each program starts in a session of its own, so stopping it signals its whole process
group (a shell pipeline or forked workers included). One ``Reaper`` thread waits for
every child through pidfds, so an exit is recorded the moment it happens, with its
resource usage, whatever the service's callbacks are doing. The core is made a child
subreaper, so a program's orphaned children become the core's children; the reaper
kills what is left of a group when its leader exits and reaps those orphans too, so no
process and no zombie outlives a service.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import resource
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from soaf.errors import ProgramError
from soaf.process.stop import GroupStop

log = logging.getLogger(__name__)

#: Seconds between two sweeps for orphaned, exited members of running programs' groups.
SWEEP_INTERVAL = 1.0
_PR_SET_CHILD_SUBREAPER = 36
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux); False if refused.

    Without it, a program's forked children that outlive their parent are re-parented to
    PID 1, which in a container often never reaps them (they stay zombies).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
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


@dataclass(frozen=True)
class Exit:
    """How a program ended, with what it cost."""

    returncode: int  # negative: killed by that signal (as subprocess reports it)
    wall_time: float
    cpu_time: float
    max_rss_kb: int

    @property
    def exit_code(self) -> int | None:
        return self.returncode if self.returncode >= 0 else None

    @property
    def signal(self) -> str | None:
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"


ExitCallback = Callable[[int, int, "resource.struct_rusage | None"], None]


#: Seconds the reaper waits for a dead leader's SIGKILLed group members to be reapable.
GROUP_REAP_WAIT = 0.2


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

    def watch(self, pid: int, callback: ExitCallback) -> None:
        """Call ``callback(pid, status, rusage)`` from the reaper thread when ``pid`` exits.

        ``pid`` must lead its own process group (``start_new_session``)."""
        with self._lock:
            self._pending.append((pid, callback))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while not self._stopping:
            timeout = 0.1 if self._dead else SWEEP_INTERVAL
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
            for pid, callback in pending:
                self._live.add(pid)
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    self._reap(pid, callback, block=True)
                    continue
                self._selector.register(fd, selectors.EVENT_READ, (pid, callback))
            for pgid in list(self._dead):
                self._sweep_dead(pgid)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL
                for pgid in list(self._live):
                    self._sweep_live(pgid)

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


def group_rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, in KiB (0 once it is gone)."""
    total = 0
    todo = [pid]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE_KB
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", "rb") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


class Process:
    """One program run in its own session, its output going to two files."""

    def __init__(
        self,
        argv: list[str],
        *,
        cwd: Path,
        env: dict[str, str],
        stdout: Path,
        stderr: Path,
    ) -> None:
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.stdout_path = stdout
        self.stderr_path = stderr
        self.pid: int | None = None
        self.started_at = 0.0
        self.exit: Exit | None = None
        self.exited = threading.Event()
        self._popen: subprocess.Popen[bytes] | None = None
        self._on_exit: list[Callable[[Exit], None]] = []
        self._stop = GroupStop(self.signal_group, describe=lambda: f"pid {self.pid}")

    def on_exit(self, callback: Callable[[Exit], None]) -> None:
        """Call ``callback(exit)`` (from the reaper thread) when the program has ended,
        before ``exited`` is set."""
        self._on_exit.append(callback)

    def start(self, reaper: Reaper) -> int:
        """Spawn the program; ProgramError (in plain words) when it cannot start."""
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ProgramError(f"command must be a non-empty list of strings, got {self.argv!r}")
        try:
            # O_APPEND: the output files may be trimmed at their head while the program runs.
            with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
                self.started_at = time.monotonic()
                self._popen = subprocess.Popen(
                    self.argv,
                    cwd=self.cwd,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
        except OSError as e:
            raise ProgramError(self._why_not_started(e)) from e
        self.pid = self._popen.pid
        reaper.watch(self.pid, self._reaped)
        return self.pid

    def _why_not_started(self, e: OSError) -> str:
        """The reason a spawn failed, in plain words (the cwd or the executable?)."""
        program = self.argv[0]
        if e.filename is not None and str(e.filename) == str(self.cwd):
            if isinstance(e, FileNotFoundError):
                return f"working directory {self.cwd} does not exist"
            if isinstance(e, NotADirectoryError):
                return f"working directory {self.cwd} is not a directory"
            if isinstance(e, PermissionError):
                return f"working directory {self.cwd} is not accessible (permission denied)"
            return f"cannot enter working directory {self.cwd}: {e.strerror or e}"
        if isinstance(e, FileNotFoundError):
            return f"executable not found: {program} ({e.strerror})"
        if isinstance(e, PermissionError):
            if (self.cwd / program).is_dir() or Path(program).is_dir():
                return f"{program} is a directory, not a program"
            return f"permission denied running {program} (is it executable?)"
        if e.errno == errno.ENOEXEC:
            return (f"{program} is not a program this machine can run "
                    "(missing '#!' line or wrong architecture)")
        return f"cannot start {program}: {e.strerror or e}"

    def _reaped(self, pid: int, status: int, usage: resource.struct_rusage | None) -> None:
        code = os.waitstatus_to_exitcode(status) if usage is not None else -1
        if self._popen is not None:
            self._popen.returncode = code
        self.exit = Exit(
            returncode=code,
            wall_time=time.monotonic() - self.started_at,
            cpu_time=(usage.ru_utime + usage.ru_stime) if usage else 0.0,
            max_rss_kb=usage.ru_maxrss if usage else 0,
        )
        for callback in self._on_exit:  # before ``exited``: whoever waits sees their effects
            try:
                callback(self.exit)
            except Exception:
                log.exception("on_exit callback failed for pid %d", pid)
        self.exited.set()

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the program's whole process group; False if it is gone."""
        if self.pid is None or self.exited.is_set():
            return False
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def rss_kb(self) -> int:
        """Resident memory of the program and its descendants now, in KiB."""
        if self.pid is None or self.exited.is_set():
            return 0
        return group_rss_kb(self.pid)

    def begin_stop(self, grace: float) -> None:
        """Start stopping the group (soaf.process.stop): SIGTERM now, SIGKILL once
        ``grace`` seconds have passed (see ``tick``). Never blocks."""
        if not self.exited.is_set():
            self._stop.begin(grace)

    def tick(self) -> None:
        """Send the SIGKILL a stop has become due for."""
        self._stop.tick()

    @property
    def stopped_with(self) -> str | None:
        """The last signal soaf sent to stop the program (SIGTERM, or SIGKILL after the grace)."""
        return self._stop.stopped_with

    @property
    def stopping(self) -> bool:
        return self._stop.stopping
