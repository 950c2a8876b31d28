"""Matching output patterns in a work dir: regular files only, no links followed, bounded.

A program writes its work dir, so nothing in it can be trusted to be a plain file tree.
Wildcard parts of a pattern (``*``, ``?``, ``[...]``, ``**``) look only into real
directories: a symbolic link is never descended into, so ten ``ln -s . lN`` cannot turn
``*/*/*/*/*/*/out.txt`` into a million paths. A literal part may pass through a link
that stays inside the work dir (the names were confined already, soaf.data.workdir). Only
regular files are taken: FIFOs, sockets, devices (which would block or never end a
read) and links met under a wildcard or inside a matched directory are skipped, each
with a note for the record. A search that finds more than ``MAX_OUTPUT_FILES`` files,
looks at more than ``MAX_ENTRIES_SEEN`` entries, or runs past ``MATCH_TIME_LIMIT``
seconds stops with ``OutputLimitError``; one whose ``stop`` callable turns true (a
cancel, the core stopping) stops with ``TransferStopped``.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from soaf.errors import OutputLimitError, TransferStopped

#: Files all the output patterns of one service may match together.
MAX_OUTPUT_FILES = 10_000
#: Directory entries one collection may look at while matching.
MAX_ENTRIES_SEEN = 200_000
#: Seconds one collection may spend matching.
MATCH_TIME_LIMIT = 30.0
#: Notes kept per collection (the rest are counted).
MAX_NOTES = 20

_MAGIC = frozenset("*?[")
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISLNK, "a symbolic link"))


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


class Matcher:
    """Matches the output patterns of one collection, sharing its bounds and its notes."""

    def __init__(self, work_dir: Path, *, stop: Callable[[], bool] | None = None,
                 max_files: int = MAX_OUTPUT_FILES, max_entries: int = MAX_ENTRIES_SEEN,
                 time_limit: float = MATCH_TIME_LIMIT) -> None:
        self.root = os.path.realpath(work_dir)
        self.stop = stop
        self.max_files = max_files
        self.max_entries = max_entries
        self.time_limit = time_limit
        self.deadline = time.monotonic() + time_limit
        self.seen = 0
        self.taken: set[str] = set()
        #: Why files were left out ("'out/pipe' is a FIFO, not a regular file; skipped").
        self.notes: list[str] = []
        self.skipped = 0

    def match(self, pattern: str) -> list[str]:
        """The regular files (relative names) ``pattern`` stands for."""
        parts = [p for p in PurePosixPath(pattern).parts if p not in ("", ".")]
        found: set[str] = set()
        if parts:
            self._walk(self.root, "", parts, found)
        return sorted(found)

    # -- the walk -----------------------------------------------------------------------

    def _tick(self) -> None:
        self.seen += 1
        if self.stop is not None and self.stop():
            raise TransferStopped("stopped while matching outputs")
        if self.seen > self.max_entries:
            raise OutputLimitError(f"output patterns looked at more than {self.max_entries} "
                                   "entries of the work dir; not collected")
        if time.monotonic() > self.deadline:
            raise OutputLimitError(f"matching the output patterns took more than "
                                   f"{self.time_limit:g} s; not collected")

    def _note(self, rel: str, why: str) -> None:
        self.skipped += 1
        if len(self.notes) < MAX_NOTES:
            self.notes.append(f"{rel!r} {why}; skipped")

    def _entries(self, directory: str) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError:
            return []

    def _walk(self, directory: str, rel: str, parts: list[str], found: set[str]) -> None:
        part, rest = parts[0], parts[1:]
        if part == "**":
            if rest:
                self._walk(directory, rel, rest, found)
            for entry in self._entries(directory):
                self._tick()
                if entry.is_dir(follow_symlinks=False):
                    self._walk(entry.path, _join(rel, entry.name), parts, found)
                elif not rest:
                    self._take(entry.path, _join(rel, entry.name), found, literal=False)
            return
        if _MAGIC.isdisjoint(part):
            self._tick()
            path, name = os.path.join(directory, part), _join(rel, part)
            if not rest:
                self._take(path, name, found, literal=True)
                return
            real = os.path.realpath(path)
            if self._inside(real) and os.path.isdir(real):
                self._walk(real, name, rest, found)
            return
        for entry in self._entries(directory):
            self._tick()
            if not fnmatchcase(entry.name, part):
                continue
            name = _join(rel, entry.name)
            if not rest:
                self._take(entry.path, name, found, literal=False)
            elif entry.is_dir(follow_symlinks=False):
                self._walk(entry.path, name, rest, found)

    def _take(self, path: str, rel: str, found: set[str], *, literal: bool) -> None:
        try:
            st = os.lstat(path)
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode):
            if not literal:
                self._note(rel, "is a symbolic link, matched by a wildcard")
                return
            real = os.path.realpath(path)
            if not self._inside(real):
                self._note(rel, f"leads out of the work dir (-> {real})")
                return
            try:
                st = os.stat(real)
            except OSError:
                return
            path = real
        if stat.S_ISDIR(st.st_mode):
            self._tree(path, rel, found)
        elif stat.S_ISREG(st.st_mode):
            self._add(rel, found)
        else:
            self._note(rel, f"is {kind_of(st.st_mode)}, not a regular file")

    def _tree(self, directory: str, rel: str, found: set[str]) -> None:
        """Every regular file below a matched directory; links are not followed."""
        for entry in self._entries(directory):
            self._tick()
            name = _join(rel, entry.name)
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                self._tree(entry.path, name, found)
            elif stat.S_ISREG(mode):
                self._add(name, found)
            else:
                self._note(name, f"is {kind_of(mode)}, not a regular file")

    def _add(self, rel: str, found: set[str]) -> None:
        found.add(rel)
        self.taken.add(rel)
        if len(self.taken) > self.max_files:
            raise OutputLimitError(f"output patterns matched more than {self.max_files} "
                                   "files; not collected")

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root + os.sep)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name
