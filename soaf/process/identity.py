"""Tell one process from another by pid *and* start time, so a recycled pid is never taken
for a program soaf started, and stop a process group only when its leader is verified.

A pid alone names a process only until it exits: the kernel hands the number out again.
The start time (field 22 of ``/proc/<pid>/stat``, in clock ticks after boot) and the boot
id together make the identity unique for the life of the machine. Everything here reads
``/proc`` and so works on Linux only; elsewhere nothing can be verified and nothing is
killed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soaf.config import host_name
from soaf.process.stop import GroupStop, killpg

log = logging.getLogger(__name__)

_PROC = Path("/proc")


@functools.cache
def boot_id() -> str:
    """This boot's random id; pids and start times are only comparable within one boot."""
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Stat:
    """The parts of ``/proc/<pid>/stat`` soaf needs."""

    state: str  # R, S, D, Z (zombie: exited, not reaped), X ...
    pgid: int
    start_time: int
    ppid: int = 0

    @property
    def exited(self) -> bool:
        return self.state in ("Z", "X", "x")


def pid_exists(pid: int) -> bool:
    """Some process (any user's, a zombie included) has this pid now."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_proc(path: str) -> bytes:
    """The whole of a /proc file; OSError as ``open`` or ``read`` raise it.

    One open, as few reads as the size needs, and a close: Path.read_bytes adds an fstat,
    an ioctl and two lseeks. Each of those is a system call that lets go of the GIL, and in
    the core, where many threads wait for it, each such release can cost two thread
    switches. The enforcer, the reaper and the lineage sweeper read /proc all the time. A
    /proc read that returns less than was asked for has reached the end (the kernel fills
    the buffer as far as the file goes)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks, size = [], _PROC_READ
        while True:
            chunk = os.read(fd, size)
            chunks.append(chunk)
            if len(chunk) < size:
                return b"".join(chunks)
            size = min(size * 4, 1 << 22)
    finally:
        os.close(fd)


#: Bytes asked for by the first read of a /proc file (most are far smaller).
_PROC_READ = 4096


def read_stat(pid: int) -> Stat | None:
    """The process's stat, or None when there is no such process (or no procfs)."""
    try:
        data = read_proc(f"/proc/{pid}/stat")
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2:].split()
    return Stat(state=rest[0].decode(), pgid=int(rest[2]), start_time=int(rest[19]),
                ppid=int(rest[1]))


@dataclass(frozen=True)
class ProcIdentity:
    """Who a process is: pid, start time, its group, and the machine and boot it ran on."""

    pid: int
    start_time: int
    pgid: int
    host: str
    boot_id: str

    @classmethod
    def of(cls, pid: int) -> ProcIdentity | None:
        """The identity of a live process on this machine, or None if it is gone."""
        stat = read_stat(pid)
        if stat is None:
            return None
        return cls(pid=pid, start_time=stat.start_time, pgid=stat.pgid, host=host_name(),
                   boot_id=boot_id())

    @classmethod
    def from_dict(cls, data: Any) -> ProcIdentity | None:
        try:
            return cls(pid=int(data["pid"]), start_time=int(data["start_time"]),
                       pgid=int(data["pgid"]), host=str(data["host"]),
                       boot_id=str(data["boot_id"]))
        except (KeyError, TypeError, ValueError):
            return None

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time, "pgid": self.pgid,
                "host": self.host, "boot_id": self.boot_id}

    @property
    def local(self) -> bool:
        """True when this process ran on this machine in this boot, so /proc can tell."""
        return bool(self.boot_id) and self.host == host_name() and self.boot_id == boot_id()

    def same(self) -> bool:
        """True while the pid still names this very process (a zombie included)."""
        if not self.local:
            return False
        stat = read_stat(self.pid)
        return stat is not None and stat.start_time == self.start_time

    def alive(self) -> bool:
        """True while this very process exists and has not exited."""
        if not self.local:
            return False
        stat = read_stat(self.pid)
        return stat is not None and stat.start_time == self.start_time and not stat.exited


def pidfd_for(identity: ProcIdentity) -> int | None:
    """A pidfd for the verified process, or None when it has exited or is another one.

    The identity is checked again after the pidfd is open: the fd pins the process, so a
    match then means the fd refers to our process and not to a new one with that pid.
    """
    try:
        fd = os.pidfd_open(identity.pid)
    except (ProcessLookupError, OSError):
        return None
    if identity.alive():
        return fd
    os.close(fd)
    return None


def wait_exit(identity: ProcIdentity, timeout: float) -> bool:
    """Wait until the process has exited; True if it did within ``timeout``."""
    fd = pidfd_for(identity)
    if fd is None:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        return bool(ready) or not identity.alive()
    finally:
        os.close(fd)


def verified(identity: ProcIdentity) -> ProcIdentity | None:
    """``identity`` as this machine sees it now, or None when it names nothing soaf may
    signal: no such process, another one (start time), not the leader of its own group
    (every program soaf spawns leads its own session), or this core's own group.

    The group id is read from ``/proc``, never taken from ``identity``: an identity may
    come from a place others can write to, and a group named there is no proof."""
    if not identity.local or identity.pid <= 1 or identity.pid == os.getpid():
        return None
    stat = read_stat(identity.pid)
    if stat is None or stat.start_time != identity.start_time:
        return None
    if stat.pgid != identity.pid or stat.pgid == os.getpgrp():
        return None
    return ProcIdentity(pid=identity.pid, start_time=stat.start_time, pgid=stat.pgid,
                        host=identity.host, boot_id=identity.boot_id)


def signaller(identity: ProcIdentity) -> Callable[[int], bool]:
    """A ``signal_group`` for GroupStop that signals the group of ``identity`` only while
    its leader is verifiably that process (pid *and* start time, group read from /proc)."""
    def signal_group(sig: int) -> bool:
        checked = verified(identity)
        return checked is not None and killpg(checked.pgid, sig)
    return signal_group


def stop_group(identity: ProcIdentity, grace: float) -> bool:
    """Stop the verified process's group (soaf.process.stop) and wait for its end; False
    if it was not (or no longer) that process, so nothing was signalled."""
    checked = verified(identity)
    if checked is None or not checked.alive():
        return False
    identity = checked
    signal_group = signaller(identity)
    stop = GroupStop(signal_group, describe=lambda: f"pid {identity.pid}")
    stop.begin(grace)
    if not wait_exit(identity, grace):
        stop.begin(0)  # the grace is over: SIGKILL
        wait_exit(identity, 5.0)
    # The leader is gone (or a zombie that still holds its pid and group id): whatever it
    # left in its group goes too, as when a core reaps its own child.
    if identity.same() or read_stat(identity.pid) is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(identity.pgid, signal.SIGKILL)
    return True


def find_by_marker(marker: str) -> list[ProcIdentity]:
    """Live processes whose command line contains ``marker`` (a path unique to one run),
    the topmost only: a child the shim has forked but not yet exec'd shares its command
    line for a moment, and is not the one to take."""
    found: list[ProcIdentity] = []
    needle = marker.encode()
    try:
        entries = os.listdir(_PROC)
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            cmdline = (_PROC / name / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline.split(b"\0"):
            identity = ProcIdentity.of(int(name))
            if identity is not None and identity.alive():
                found.append(identity)
    pids = {f.pid for f in found}
    return [f for f in found if (stat := read_stat(f.pid)) is None or stat.ppid not in pids]


def started_ago(identity: ProcIdentity) -> float | None:
    """Seconds since the process started, from its start time and the system uptime."""
    try:
        uptime = float((_PROC / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - identity.start_time / os.sysconf("SC_CLK_TCK"))

