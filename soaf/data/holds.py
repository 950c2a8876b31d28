"""The exclusive holds of the work-root lock under which a sweep removes and trims dirs.

Every service start holds ``.soaf/gc.lock`` shared while it writes its run marker and
creates its dir (soaf.data.markers), so no dir can be taken while the sweep holds it
exclusively. Under each hold the sweep checks again that a dir it chose at its first look
is still free, then acts. The lock is let go every ``HOLD_DIRS`` dirs, so a service that
starts during a big sweep waits for one hold, not for the whole sweep.

Whether a chosen dir is still free needs only the markers that may name it now: its own
(read again), and those that were new, or could not be read, at the sweep's first look
(each new one read once, by the first hold that lists it). A marker names the dir of its
own service, the same for all its attempts, so no other marker can come to name a chosen
dir. (Reading every marker again for each dir removed made a sweep quadratic in the dirs
a core keeps: 45 s of CPU, most of it under the lock, to remove 2,000 dirs.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from soaf.config import host_name
from soaf.data.markers import Marker, abandoned, meta_dir, read_marker, runs_dir, work_root_lock

T = TypeVar("T")
#: What returns the (resolved) work dirs this process is running services in.
InUse = Callable[[], "set[Path]"]
#: Dirs removed or trimmed under one hold of the exclusive lock (then it is let go, so
#: that services can start, and taken again).
HOLD_DIRS = 256
#: What ``Path.exists`` takes for "not there" (any other error is raised).
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, symlinks followed; None when it does not exist. The
    same dir has the same identity whatever path leads to it: one ``stat`` where
    ``resolve`` made one per path component."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise
    return st.st_dev, st.st_ino


def identities(paths: Iterable[Path]) -> set[tuple[int, int]]:
    return {found for p in paths if (found := identity(p)) is not None}


class Holds:
    """The holds a sweep acts under, ``HOLD_DIRS`` dirs each. ``seen``: the names of the
    marker files its first look read (and could read)."""

    def __init__(self, root: Path, seen: set[str], in_use: InUse | None, *,
                 dry_run: bool) -> None:
        self.root = root
        self.in_use = in_use
        self.dry_run = dry_run
        #: Marker files whose dir is known: read at the first look, or by an earlier hold.
        self.seen = set(seen)
        #: The markers of files new since the first look, by the dir they name, read by an
        #: earlier hold. Which dir each names never changes; a later change of its state
        #: cannot free a chosen dir it names (its service is not among that dir's), so none
        #: is read twice.
        self.fresh: dict[str, list[Marker]] = {}

    def each(self, items: list[T], *, until: Callable[[], bool] = lambda: False
             ) -> Iterator[tuple[Hold, T]]:
        """Each of ``items`` with the hold to act on it under, until ``until()`` says
        enough (checked before each; no hold is taken for nothing)."""
        for start in range(0, len(items), HOLD_DIRS):
            if until():
                return
            with Hold(self) as hold:
                for item in items[start:start + HOLD_DIRS]:
                    if until():
                        return
                    yield hold, item


class Hold:
    """One exclusive hold of the lock (none in a dry run), with the markers as they are now."""

    def __init__(self, holds: Holds) -> None:
        self.root = holds.root
        self.holds = holds
        self.dry_run = holds.dry_run
        self.host = host_name()
        self.unread: list[Marker] = []  # being written: read again by the next hold
        self.busy: set[tuple[int, int]] = set()
        self.trashed: list[Path] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Hold:
        if self.dry_run:
            return self
        holds = self.holds
        self._stack.enter_context(work_root_lock(self.root, exclusive=True))
        directory = runs_dir(self.root)
        try:
            names = os.listdir(directory)
        except OSError:
            names = []
        for name in names:
            if name.endswith(".json") and name not in holds.seen:
                marker = read_marker(directory / name)
                if marker is None:
                    continue
                if marker.work_dir:
                    holds.seen.add(name)
                    holds.fresh.setdefault(marker.work_dir, []).append(marker)
                else:
                    self.unread.append(marker)
        self.busy = identities(holds.in_use()) if holds.in_use else set()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        for trash in self.trashed:  # after the lock: services need not wait for this
            shutil.rmtree(trash, ignore_errors=True)

    def still_free(self, name: str, path: Path, markers: list[Marker]) -> bool:
        """Has nobody taken the dir ``name`` (at ``path``, finished runs ``markers`` at the
        sweep's first look) since? Always, in a dry run."""
        if self.dry_run:
            return True
        own = {m.path for m in markers if m.path is not None}
        mine = [m for m in map(read_marker, own) if m is not None]
        now = [m for m in (*mine, *self.holds.fresh.get(name, ()), *self.unread)
               if m.work_dir == name or not m.work_dir]
        if any(not m.final and not abandoned(m, self.host) for m in now):
            return False
        if {m.service_id for m in now} != {m.service_id for m in markers}:
            return False
        return identity(path) not in self.busy

    def trash(self, path: Path) -> bool:
        """Move ``path`` out of the way (removed once the lock is let go); False if gone."""
        target = meta_dir(self.root) / "trash" / uuid.uuid4().hex
        if not self.trashed:  # (once a hold)
            target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return False
        self.trashed.append(target)
        return True
