"""Run one external program: its own session, output to files, stop, reap. No Redis here.

Each program starts in a session of its own, so stopping it signals its whole process
group (a shell pipeline or forked workers included). One ``Reaper`` thread waits for
every child through pidfds, so an exit is recorded the moment it happens, with its
resource usage, whatever the service's callbacks are doing.
"""

from __future__ import annotations

import contextlib
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

log = logging.getLogger(__name__)


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


class Reaper:
    """One thread that reaps every child it is told about, through pidfds."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: list[tuple[int, ExitCallback]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="soaf-reaper", daemon=True)
        self._thread.start()

    def watch(self, pid: int, callback: ExitCallback) -> None:
        """Call ``callback(pid, status, rusage)`` from the reaper thread when ``pid`` exits."""
        with self._lock:
            self._pending.append((pid, callback))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=1.0):
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
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    self._reap(pid, callback, block=True)
                    continue
                self._selector.register(fd, selectors.EVENT_READ, (pid, callback))

    def _reap(self, pid: int, callback: ExitCallback, *, block: bool = False) -> bool:
        try:
            got, status, usage = os.wait4(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            got, status, usage = pid, 0, None
        if got == 0:
            return False
        try:
            callback(pid, status, usage)
        except Exception:
            log.exception("exit callback for pid %d failed", pid)
        return True


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

    def on_exit(self, callback: Callable[[Exit], None]) -> None:
        """Call ``callback(exit)`` (from the reaper thread) when the program has ended."""
        self._on_exit.append(callback)

    def start(self, reaper: Reaper) -> int:
        """Spawn the program; ProgramError (in plain words) when it cannot start."""
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ProgramError(f"command must be a non-empty list of strings, got {self.argv!r}")
        if not self.cwd.is_dir():
            raise ProgramError(f"working directory {self.cwd} does not exist")
        try:
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
        except FileNotFoundError as e:
            raise ProgramError(f"executable not found: {self.argv[0]} ({e.strerror})") from e
        except PermissionError as e:
            raise ProgramError(
                f"permission denied running {self.argv[0]} (is it executable?)"
            ) from e
        except OSError as e:
            if e.errno == errno.ENOEXEC:
                raise ProgramError(
                    f"{self.argv[0]} is not a program this machine can run "
                    "(missing '#!' line or wrong architecture)"
                ) from e
            raise ProgramError(f"cannot start {self.argv[0]}: {e.strerror or e}") from e
        self.pid = self._popen.pid
        reaper.watch(self.pid, self._reaped)
        return self.pid

    def _reaped(self, pid: int, status: int, usage: resource.struct_rusage | None) -> None:
        code = os.waitstatus_to_exitcode(status) if usage is not None else -1
        if self._popen is not None:
            self._popen.returncode = code
        # Whatever the leader left behind in its group goes with it: no stray processes.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self.exit = Exit(
            returncode=code,
            wall_time=time.monotonic() - self.started_at,
            cpu_time=(usage.ru_utime + usage.ru_stime) if usage else 0.0,
            max_rss_kb=usage.ru_maxrss if usage else 0,
        )
        self.exited.set()
        for callback in self._on_exit:
            try:
                callback(self.exit)
            except Exception:
                log.exception("on_exit callback failed for pid %d", pid)

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the program's whole process group; False if it is gone."""
        if self.pid is None or self.exited.is_set():
            return False
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def stop(self, grace: float) -> None:
        """SIGTERM the group, then SIGKILL it if it has not exited after ``grace`` seconds."""
        if self.signal_group(signal.SIGTERM) and not self.exited.wait(grace):
            self.signal_group(signal.SIGKILL)
        self.exited.wait(grace + 5)
