"""Which processes came from one run of a program, and ending every one of them.

A program may leave its process group (``setsid``, a daemon's double fork); the group
stop then misses it, and once its parent exits the core, a child subreaper
(soaf.process.reaper), inherits it. Each run's program gets a token in its environment
(``SOAF_RUN=<service id>/<attempt>/<nonce>``) that its children inherit; a process is
this run's only if it descends from the core *and* its ``/proc/<pid>/environ`` holds that
token, read through a pidfd opened first, so a recycled pid is never signalled.

``RunLineage.observe`` (called while the program runs) remembers the token's processes;
``RunLineage.end`` (when the program has ended) SIGKILLs those still alive, and whatever
runs below them, and reaps the ones that are the core's children, including escapees
that exited while the run lasted and were seen alive once, and zombies below them. An
escapee that clears its own environment and whose parent is gone is out of reach, like
one running under another user. A restarted core that adopts a program finds its token
in the run's journal on disk and, once the program ends, looks for it machine-wide: the
dead core's leftovers were handed to another reaper. Linux only; elsewhere nothing is
found.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable

from soaf.process.census import RUN_VAR, census, token_of
from soaf.process.identity import read_proc, read_stat

log = logging.getLogger(__name__)

#: Seconds ``end`` waits for the killed processes to be reaped.
END_WAIT = 2.0


def new_token(service_id: str, attempt: int) -> str:
    """A token unique to one run: its ids and a random part no other run can guess."""
    return f"{service_id}/{attempt}/{secrets.token_hex(8)}"


def _leaders(pid: int) -> tuple[int, int]:
    """(process group, session) of ``pid``; (0, 0) when it is gone."""
    try:
        data = read_proc(f"/proc/{pid}/stat")
        rest = data[data.rindex(b")") + 2:].split()
        return int(rest[2]), int(rest[3])
    except (OSError, ValueError, IndexError):
        return 0, 0


def direct_children(pid: int) -> set[int]:
    """The children of ``pid``, from its threads' ``children`` files (a core has dozens of
    threads, and this runs a few times a second while services end: read_proc)."""
    found: set[int] = set()
    tasks = f"/proc/{pid}/task"
    try:
        names = os.listdir(tasks)
    except OSError:
        return found
    for task in names:
        try:
            found.update(map(int, read_proc(f"{tasks}/{task}/children").split()))
        except (OSError, ValueError):
            continue
    return found


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process in /proc."""
    parents: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return parents
    for name in names:
        if not name.isdigit():
            continue
        try:
            data = read_proc(f"/proc/{name}/stat")
            parents[int(name)] = int(data[data.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    return children


def descendants(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """Every process below ``root`` (children, their children ...; zombies included)."""
    children = _children() if children is None else children
    found, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _carries(pid: int, needle: bytes) -> int | None:
    """A pidfd for ``pid`` if its environment holds ``needle``, else None (closed)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        environ = read_proc(f"/proc/{pid}/environ")
    except OSError:
        environ = b""
    if needle in environ.split(b"\0"):
        return fd
    os.close(fd)
    return None


class RunLineage:
    """The processes of one run, found by its token among the core's descendants, or
    ``anywhere`` on the machine: a program a restarted core adopted, whose leftovers the
    dead core's exit handed to another reaper (they are killed, and reaped by it)."""

    def __init__(self, token: str, *, root: int | None = None, anywhere: bool = False) -> None:
        self.token = token
        self.anywhere = anywhere
        self.root = 0 if anywhere else os.getpid() if root is None else root
        self._needle = f"{RUN_VAR}={token}".encode()
        #: pid -> start time of every process seen with the token.
        self.seen: dict[int, int] = {}
        self._key = token.encode()
        self._generation = -1

    def observe(self, *, force: bool = False) -> list[int]:
        """Remember the token's processes found by the shared census's latest look (a new
        look once the last is a second old, or ``force``: soaf.process.census); their
        pids, or [] when this run has picked that look up already. Cheap enough for every tick: a run
        called at least once per interval misses no look."""
        if self.anywhere:
            return []  # (a machine-wide scan is left to ``end``)
        generation, members = census.take(self.root, force=force)
        if generation == self._generation:
            return []
        self._generation = generation
        found = members.get(self._key, [])
        self.seen.update(found)
        return [pid for pid, _start in found]

    def end(self, *, wait: float = END_WAIT) -> int:
        """SIGKILL every live process of the run and reap those that are the core's
        children (or become so); how many were killed."""
        killed = 0
        deadline = time.monotonic() + wait
        while True:
            found = 0
            for pid, fd in self._members():
                with contextlib.suppress(OSError):
                    stat = read_stat(pid)
                    if stat is not None:
                        self.seen[pid] = stat.start_time
                        if not stat.exited:
                            signal.pidfd_send_signal(fd, signal.SIGKILL)
                            found += 1
                os.close(fd)
            killed += found
            self._reap()
            if (not found and not self._waiting()) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if killed:
            log.info("killed %d process(es) left behind by run %s", killed, self.token)
        return killed

    def _members(self) -> list[tuple[int, int]]:
        """(pid, pidfd) of every process of the run: the core's descendants that carry
        the token, and everything below them (a zombie's environment cannot be read, and a
        child may have cleared its own)."""
        children = _children()
        mine = set(descendants(self.root, children))
        members: dict[int, int] = {}
        for pid in mine:
            if pid in members:
                continue
            fd = _carries(pid, self._needle)
            if fd is None:
                continue
            members[pid] = fd
            # The leader of its group and session (a daemon's first fork, that called
            # setsid and exited) descends from the program too: a zombie to reap.
            related = [*descendants(pid, children), *_leaders(pid)]
            for other in related:
                if other in mine and other not in members:
                    with contextlib.suppress(OSError):
                        members[other] = os.pidfd_open(other)
        return list(members.items())

    def _waiting(self) -> bool:
        """Some process seen with the token still exists (alive or a zombie)."""
        return any(self._same(pid, start) for pid, start in self.seen.items())

    def _same(self, pid: int, start: int) -> bool:
        stat = read_stat(pid)
        return stat is not None and stat.start_time == start

    def _reap(self) -> None:
        """Reap the seen processes that are the core's children and have exited."""
        for pid, start in list(self.seen.items()):
            stat = read_stat(pid)
            if stat is None or stat.start_time != start:
                del self.seen[pid]  # gone (reaped by its own parent)
                continue
            if not stat.exited:
                continue
            try:
                got, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # not ours (yet): its parent reaps it, or it comes to us
            if got:
                del self.seen[pid]


class LineageSweeper:
    """Ends what finished runs left behind, for all runs of a core, in one thread.

    An escapee is reparented to the core or its spawner (child subreapers) once its parent
    dies, so after a run's program has ended, its leftovers are among their direct children
    that are not running programs (``known``), carrying the run's token. One look at
    the core's children every ``interval`` serves every run that ended meanwhile; only a
    run with such a child, or with processes seen while it ran, gets the full
    ``RunLineage.end``. Leftovers are thus killed within about ``interval`` of the end,
    and a run that left nothing costs the core nothing per run.
    """

    def __init__(self, known: Callable[[], set[int]], *, interval: float = 0.25,
                 parents: Callable[[], list[int]] | None = None) -> None:
        """``known``: the running programs; ``parents``: the processes orphans are
        handed to (the core, and its spawner: soaf.process.spawner)."""
        self.known = known
        self.parents = parents or (lambda: [os.getpid()])
        self.interval = interval
        self._lock = threading.Lock()
        self._ended: list[RunLineage] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="soaf-lineage", daemon=True)
        self._thread.start()

    def add(self, lineage: RunLineage) -> None:
        """``lineage``'s program has ended: end what it left, soon."""
        with self._lock:
            self._ended.append(lineage)
        self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=END_WAIT + 1)
        self.sweep()  # what ended last is not left behind

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            time.sleep(self.interval)  # gather the runs that end meanwhile
            try:
                self.sweep()
            except Exception:
                log.exception("ending what finished runs left behind failed")

    def sweep(self) -> int:
        """One pass over the runs that ended; how many processes were killed."""
        with self._lock:
            ended, self._ended = self._ended, []
        if not ended:
            return 0
        children: set[int] = set()
        for parent in self.parents():
            children |= direct_children(parent)
        carriers = {token for pid in children - self.known()
                    if (token := token_of(pid)) is not None}
        return sum(lineage.end() for lineage in ended
                   if lineage.seen or lineage.anywhere or lineage.token.encode() in carriers)
