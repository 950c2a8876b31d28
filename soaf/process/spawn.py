"""Spawn one external program: its own session, output to files, its exit. No Redis here.

Each program starts in a session of its own, so stopping it (soaf.process.stop) signals
its whole process group (a shell pipeline or forked workers included). Its exit, with
its resource usage, is recorded by the reaper (soaf.process.reaper) the moment it
happens, whatever the service's callbacks are doing.

A program is spawned by the core's spawner (soaf.process.spawner), which is its parent and
writes its exit file; without a spawner, the core spawns it itself, under the shim
(soaf.process.shim) when it has an exit file. What a program costs is the program's own,
not its shim's: the core's limit enforcer samples the group's resident memory and the
program's CPU time from ``/proc`` (``Process.rss_kb``), and the exit combines those
samples with its leader's rusage, which holds the program's CPU time, and its peak memory
when that is above what the leader inherited from its parent (the spawner's size, which
a posix_spawn'd child's peak starts from, or the core's, which the shim was forked with).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from soaf.errors import ProgramError
from soaf.process import affinity, shim
from soaf.process.latch import Latch
from soaf.process.reaper import Reaper
from soaf.process.spawner import SpawnerGone
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
    max_rss_kb: int | None  # None: not measured (it ended before its first sample)
    #: False when the core is not the program's parent and nobody told it what the
    #: program cost (an adopted program that ran under the shim).
    usage_known: bool = True

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


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return []


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float] | None:
    """``(own, waited-for children's)`` CPU seconds of ``pid`` from ``/proc/PID/stat``
    (a zombie's too), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    except (OSError, ValueError, IndexError):
        return None
    return (utime + stime) / _TICKS, (cutime + cstime) / _TICKS


class Usage:
    """The CPU time and peak memory of one program, from samples and its shim's rusage."""

    def __init__(self, *, shimmed: bool) -> None:
        self.shimmed = shimmed
        self.program_pid: int | None = None
        self.peak_rss_kb = 0
        self.samples = 0
        self.program_cpu = 0.0  # the program's own and its children's, at the last sample
        self.shim_cpu = 0.0  # the shim's own (fork, sh), which rusage adds to the program's
        #: The parent's peak once the program was spawned (the spawner's, or the core's
        #: that the shim was forked with), which the leader's rusage starts from.
        self.inherited_kb = 0

    def find(self, leader: int) -> int | None:
        """The program's pid: the leader's, or the shim's child once it has forked it."""
        if self.program_pid is None:
            if not self.shimmed:
                self.program_pid = leader
            else:
                kids = _children(leader)
                self.program_pid = kids[0] if kids else None
        return self.program_pid

    def sample(self, leader: int) -> int:
        """Resident memory of the program's group now (KiB); notes its peak and CPU time."""
        pid = self.find(leader)
        if pid is None:
            return group_rss_kb(leader)  # the shim has not forked the program yet
        rss = group_rss_kb(pid)
        self.samples += 1
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        times = cpu_times(pid)
        if times is not None:
            self.program_cpu = max(self.program_cpu, sum(times))
        if self.shimmed:
            times = cpu_times(leader)
            if times is not None:
                self.shim_cpu = times[0]
        return rss

    def at_exit(self, usage: resource.struct_rusage | None) -> tuple[float, int | None]:
        """``(cpu_time, max_rss_kb)`` of a program whose leader was reaped with ``usage``."""
        cpu, peak = self.program_cpu, self.peak_rss_kb
        if usage is not None:
            # The leader's rusage counts the program once the shim reaped it (a group killed
            # at once leaves only the samples); its peak is the program's only above the
            # core's own size, which the shim inherited.
            cpu = max(cpu, usage.ru_utime + usage.ru_stime - self.shim_cpu)
            if usage.ru_maxrss > self.inherited_kb:
                peak = max(peak, usage.ru_maxrss)
        return cpu, (peak if peak or self.samples else None)


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
        shimmed: bool = False,
        exit_file: Path | None = None,
        cgroup: Path | None = None,
    ) -> None:
        """``exit_file``: where the program's exit status is kept for a core that restarts
        (by the spawner, else by the shim); ``cgroup``: the program runs in it."""
        self.argv = argv
        self.exit_file = exit_file
        self.cgroup = cgroup
        #: True once the core's spawner started it (it is then the spawner's child).
        self.spawned = False
        self.cwd = cwd
        self.env = env
        self.stdout_path = stdout
        self.stderr_path = stderr
        self.pid: int | None = None
        self.started_at = 0.0
        self.exit: Exit | None = None
        self.exited = Latch()
        self._popen: subprocess.Popen[bytes] | None = None
        self._on_exit: list[Callable[[Exit], None]] = []
        self._stop = GroupStop.of(self)
        self.usage = Usage(shimmed=shimmed)

    @property
    def shimmed(self) -> bool:
        """Whether it runs under the shim (then ``pid`` is the shim's)."""
        return self.usage.shimmed

    @property
    def program_pid(self) -> int | None:
        """The program's own pid (the shim's child), once seen; ``pid`` is the group leader."""
        return self.usage.program_pid

    def on_exit(self, callback: Callable[[Exit], None]) -> None:
        """Call ``callback(exit)`` (from the reaper thread) when the program has ended,
        before ``exited`` is set."""
        self._on_exit.append(callback)

    def start(self, reaper: Reaper) -> int:
        """Spawn the program; ProgramError (in plain words) when it cannot start."""
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ProgramError(f"command must be a non-empty list of strings, got {self.argv!r}")
        spawner = reaper.spawner
        if spawner is not None:
            self.started_at = time.monotonic()
            try:
                self.pid = spawner.spawn(self.argv, cwd=self.cwd, env=self.env,
                                         stdout=self.stdout_path, stderr=self.stderr_path,
                                         exit_file=self.exit_file, cgroup=self.cgroup)
            except SpawnerGone:  # (a new one is being started)
                # It may have started the program before it died: its pid is then in the
                # exit file, and the program the core's child (it is not started twice).
                self.pid = shim.running_pid(self.exit_file) if self.exit_file else None
            except OSError as e:
                raise ProgramError(self._why_not_started(e)) from e
            if self.pid is not None:
                self.spawned = True
                self.usage.program_pid = self.pid  # it leads its group: known at once
                self.usage.inherited_kb = spawner.rss_kb
                reaper.watch_spawned(self.pid, self._reaped, self.exit_file, spawner)
                return self.pid
        argv = self.argv
        if self.exit_file is not None:  # under the shim, so that its exit outlives the core
            try:
                wrapped, self.usage.shimmed = shim.wrap(argv, cwd=self.cwd, env=self.env,
                                                        exit_file=self.exit_file, cgroup=self.cgroup)
                argv = wrapped  # type: ignore[assignment]
            except ProgramError:  # it cannot start: the spawn below says why, in its words
                self.usage.shimmed = False
        try:
            # O_APPEND: the output files may be trimmed at their head while the program runs.
            with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err, \
                    affinity.spread():  # the program gets every CPU, not the core's one
                self.started_at = time.monotonic()
                self._popen = subprocess.Popen(
                    argv,
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
        self.usage.inherited_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
        cpu_time, max_rss_kb = self.usage.at_exit(usage)
        self.exit = Exit(returncode=code, wall_time=time.monotonic() - self.started_at,
                         cpu_time=cpu_time, max_rss_kb=max_rss_kb)
        # Called once, then dropped (they hold their attempt: no cycle outlives the run).
        callbacks, self._on_exit = self._on_exit, []
        for callback in callbacks:  # before ``exited``: whoever waits sees their effects
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
        """Resident memory of the program and its descendants now, in KiB: a sample, which
        also counts towards the exit's peak memory and CPU time."""
        if self.pid is None or self.exited.is_set():
            return 0
        return self.usage.sample(self.pid)
