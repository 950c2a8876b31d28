"""Spawn one external program: its own session, output to files, its exit. No Redis here.

Each program starts in a session of its own, so stopping it (soaf.process.stop) signals
its whole process group (a shell pipeline or forked workers included). Its exit, with
its resource usage, is recorded by the reaper (soaf.process.reaper) the moment it
happens, whatever the service's callbacks are doing.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from soaf.errors import ProgramError
from soaf.process.reaper import Reaper
from soaf.process.stop import GroupStop, GroupStopping, killpg

log = logging.getLogger(__name__)

#: Seconds between two sweeps for orphaned, exited members of running programs' groups.
SWEEP_INTERVAL = 1.0
_PR_SET_CHILD_SUBREAPER = 36
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


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


class Process(GroupStopping):
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
        return killpg(self.pid, sig)

    def rss_kb(self) -> int:
        """Resident memory of the program and its descendants now, in KiB."""
        if self.pid is None or self.exited.is_set():
            return 0
        return group_rss_kb(self.pid)
