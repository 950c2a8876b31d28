"""Which of the core's descendants carry which run's token: one shared look at /proc for
every running program, so watching many runs costs about what watching one does.

Each run's program gets a token in its environment (``SOAF_RUN=...``, soaf.process.lineage)
that its children inherit. A look lists /proc and reads only what is new since the last
one: a process's parent, start time and token are read once, when it first appears.

A pid listed in two looks is the same process unless the kernel handed the number out
again in between: after the pid range has wrapped (32,768 pids by default, a few minutes
of a busy core's spawning), a pid freed just ahead of the kernel's cursor comes back within
milliseconds. The kernel names the last pid it handed out (``/proc/loadavg``) and counts
every fork (``/proc/stat``), so a look knows which pids were handed out since the last
one and reads those again; after a whole lap of the range, or when those files cannot be
read, it reads everything.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from soaf.process.identity import Stat, read_proc, read_stat

#: The environment variable that marks a run's processes.
RUN_VAR = "SOAF_RUN"
#: Seconds between two looks at the core's descendants: a process of a run that lives
#: this long is seen.
OBSERVE_INTERVAL = 1.0

_PROC = Path("/proc")


def environ_of(pid: int) -> bytes:
    """``pid``'s initial environment as /proc shows it; b"" when unreadable, or while the
    process is between fork and the end of its exec (the kernel sets the new image's
    environment last: a parent's ``Popen`` may return before it is there)."""
    try:
        return read_proc(f"/proc/{pid}/environ")
    except OSError:
        return b""


def token_in(environ: bytes) -> bytes | None:
    """The run token in an environment as ``environ_of`` reads it, if any."""
    prefix = f"{RUN_VAR}=".encode()
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):]
    return None


def token_of(pid: int) -> bytes | None:
    """The run token in ``pid``'s environment, if any (None: none, or unreadable)."""
    return token_in(environ_of(pid))


def last_pid() -> int | None:
    """The pid the kernel handed out last in this pid namespace (None: unknown)."""
    try:
        return int((_PROC / "loadavg").read_bytes().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def forks() -> int | None:
    """How many processes and threads the machine has started since boot (None: unknown)."""
    try:
        with open(_PROC / "stat", "rb") as stat:
            for line in stat:
                if line.startswith(b"processes "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def pid_range() -> int:
    """How many pids the kernel hands out before it starts again from the bottom."""
    try:
        return int((_PROC / "sys/kernel/pid_max").read_bytes())
    except (OSError, ValueError):
        return 32768


def handed_out(since: int, until: int) -> tuple[range, ...]:
    """The pids handed out after ``since`` up to ``until`` (last pids), assuming the
    kernel's cursor went less than once round: one range, or two when it wrapped."""
    if until >= since:
        return (range(since + 1, until + 1),)
    return range(since + 1, pid_range()), range(0, until + 1)


class Census:
    """One shared look at the core's descendants and their run tokens, for all runs
    together, taken at most every ``OBSERVE_INTERVAL`` seconds (each run picks up every
    look: see ``RunLineage.observe``). A process's token is read once in its life: its
    initial environment changes only when it execs, and an exec keeps the inherited token
    unless the program clears it. One whose environment read empty (caught in the middle
    of its exec, or started with none) is read again at the next look."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = -1e9
        self._root = -1
        #: (last pid, forks) read just before the last look listed /proc.
        self._mark: tuple[int, int] | None = None
        self._lap = pid_range()
        #: pid -> (start time, descends from the root, token) of every process listed.
        self._known: dict[int, tuple[int, bool, bytes | None]] = {}
        #: Processes below the root whose environment read empty: read again next look.
        self._unread: set[int] = set()
        #: Counts the looks; a run compares it with the last look it picked up.
        self.generation = 0
        self.members: dict[bytes, list[tuple[int, int]]] = {}

    def take(self, root: int, *, force: bool = False
             ) -> tuple[int, dict[bytes, list[tuple[int, int]]]]:
        """(generation, token -> [(pid, start time)]) of the processes below ``root`` seen
        alive, as of the last look (a new one if that is ``OBSERVE_INTERVAL`` old, or
        ``force``)."""
        with self._lock:
            now = time.monotonic()
            if root != self._root or force or now - self._at >= OBSERVE_INTERVAL:
                self._at = now
                self._look(root, full=root != self._root)
                self._root = root
                self.generation += 1
            return self.generation, self.members

    def _reused(self, mark: tuple[int, int] | None) -> tuple[range, ...] | None:
        """The pids handed out since the last look's mark, up to ``mark`` (taken after
        this look's listing); None when that cannot be told (read everything)."""
        before = self._mark
        if before is None or mark is None or mark[1] - before[1] >= self._lap // 2:
            return None
        return handed_out(before[0], mark[0])

    def _look(self, root: int, *, full: bool) -> None:
        mark = _mark()
        try:
            listed = {int(name) for name in os.listdir(_PROC) if name.isdigit()}
        except OSError:
            listed = set()
        old = self._known
        again = None if full else self._reused(_mark())
        self._mark = mark
        unread, self._unread = self._unread, set()
        if again is None:
            known = {}
        else:
            known = {pid: old[pid] for pid in listed if pid in old and pid not in unread
                     and not any(pid in span for span in again)}
        new: dict[int, Stat] = {}
        for pid in listed - known.keys():
            stat = read_stat(pid)
            if stat is not None:
                new[pid] = stat

        if root in new:
            known[root] = (new[root].start_time, False, None)

        def descends(pid: int) -> bool:
            chain = []
            while pid not in known:
                stat = new.get(pid)
                if stat is None:  # gone (or no /proc): not below the root
                    below = False
                    break
                chain.append(pid)
                if stat.ppid == root:
                    below = True
                    break
                pid = stat.ppid
            else:
                below = known[pid][1]
            for p in chain:  # a zombie's token cannot be read: it has none here
                stat = new[p]
                token = None
                if below and not stat.exited:
                    environ = environ_of(p)
                    token = token_in(environ)
                    if not environ:
                        self._unread.add(p)
                known[p] = (stat.start_time, below, token)
            return below

        for pid in new:
            if pid not in known:
                descends(pid)
        members: dict[bytes, list[tuple[int, int]]] = {}
        for pid, (start, below, token) in known.items():
            if below and token is not None:
                members.setdefault(token, []).append((pid, start))
        self._known, self.members = known, members


def _mark() -> tuple[int, int] | None:
    """(last pid handed out, forks since boot), or None when either is unknown."""
    pid, count = last_pid(), forks()
    return None if pid is None or count is None else (pid, count)


#: The one census of this process.
census = Census()
