"""Capped program logs: stdout/stderr files that keep their tail, copied line by line to Redis.

A program writes its output straight into ``stdout.log`` and ``stderr.log`` in its work
dir (opened ``O_APPEND``), with no pipe through the core: its output costs the core
nothing, and a program keeps running (and logging) if its core dies. One ``LogKeeper``
thread per core looks at every running program's files every ``log_interval`` seconds:

* **Cap.** A file holding more than ``log_max_bytes`` loses its head down to half the
  cap, in place and safely while the program appends: ``FALLOC_FL_COLLAPSE_RANGE``
  where the file system has it (ext4, xfs: the file really shrinks), else
  ``FALLOC_FL_PUNCH_HOLE`` (tmpfs, btrfs: the head becomes a hole that takes no space;
  the file keeps its apparent size). Disk use per file is thus bounded by the cap plus
  what a program writes in one interval (``FLOOD_INTERVAL`` while a file is being cut).
  When the program has ended, its files are rewritten as a plain tail (whole lines, no
  hole) of at most the cap.
* **Ship.** New complete lines go to the service's Redis log stream (``Keys.log``);
  a carriage return ends a line too, but a line redrawn with ``\r`` (a progress bar)
  ships only what it shows at each pass (its latest ``\r`` segment). The stream is
  capped to ``log_lines`` entries, so a client on another machine can read the tail and
  follow it. A flood is sampled: at most ``SHIP_MAX_BYTES``/``SHIP_MAX_LINES`` per file
  per interval, with a note saying how much was skipped (the file still keeps it).
  Lines go through the state writer, so the last ones are in Redis before the final state.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaf.protocol.keys import Keys

log = logging.getLogger(__name__)

#: Bytes of new output shipped to Redis per file and interval; the rest is skipped.
SHIP_MAX_BYTES = 64 * 1024
#: Lines shipped to Redis per file and interval.
SHIP_MAX_LINES = 200
#: Longest line shipped; longer ones are cut (the file keeps them whole).
LINE_MAX = 4096
#: Seconds between passes while some program floods its output.
FLOOD_INTERVAL = 0.05
#: The stream name of soaf's own notes in a service's log stream.
NOTE_STREAM = "soaf"

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_COLLAPSE_RANGE = 0x08
_fallocate: Any
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _fallocate = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _shown(line: bytes) -> bytes:
    """What a line redrawn with ``\r`` shows last: its last non-empty segment."""
    return next((seg for seg in reversed(line.split(b"\r")) if seg), b"")


@dataclass
class LogLines:
    """Lines for one service's log stream; written by the state writer, in order."""

    service_id: str
    entries: list[tuple[str, int, bytes]]  # (stream, attempt, line)
    maxlen: int

    def write_to(self, pipe: Any, keys: Keys) -> None:
        key = keys.log(self.service_id)
        for stream, attempt, line in self.entries:
            pipe.xadd(key, {"s": stream, "a": attempt, "l": line}, maxlen=self.maxlen,
                      approximate=True)


@dataclass
class _File:
    stream: str
    path: Path
    offset: int = 0  # next byte to ship
    head: int = 0  # bytes before this offset are a hole (punched)
    partial: bytes = b""  # an unfinished last line, not shipped yet
    dropped: int = 0  # bytes removed from the head so far
    method: str | None = None  # "collapse", "punch" or "truncate", once known
    ragged: bool = False  # cut somewhere inside a line
    seen: int = -1  # its size at the last pass


@dataclass(eq=False)
class LogHandle:
    """The log files of one attempt of one service (equal only to itself: the keeper
    finds it among dozens of running ones at once, not field by field)."""

    service_id: str
    attempt: int
    files: list[_File]
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: bool = True
    shipped: int = 0  # lines handed to the writer for the service's log stream


class LogKeeper:
    """Keeps every running program's output files capped and ships their new lines."""

    def __init__(
        self,
        put: Callable[[LogLines], None],
        *,
        max_bytes: int,
        interval: float,
        lines: int,
        connected: Callable[[], bool] = lambda: True,
    ) -> None:
        self._put = put
        self.max_bytes = max_bytes
        self.interval = interval
        self.lines = lines
        self._connected = connected
        self._handles: dict[LogHandle, None] = {}  # (a set in the order added)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soaf-logs", daemon=True)
        self.trims = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def add(self, service_id: str, attempt: int, paths: dict[str, Path]) -> LogHandle:
        """Start keeping ``{stream: path}``; output already in the files is not shipped again."""
        files = []
        for stream, path in paths.items():
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            files.append(_File(stream, path, offset=size))
        handle = LogHandle(service_id, attempt, files)
        with self._lock:
            self._handles[handle] = None
        return handle

    def finish(self, handle: LogHandle) -> dict[str, Any]:
        """The program has ended: ship the rest, leave a plain capped tail; returns sizes
        (``handle.shipped`` then says whether the service's log stream got any line)."""
        with self._lock:
            self._handles.pop(handle, None)
        stats: dict[str, Any] = {}
        with handle.lock:
            handle.active = False
            sizes = self._ship(handle, final=True)
            for f in handle.files:
                size = sizes.get(f.stream)
                if size is None:
                    continue
                try:
                    stats[f"{f.stream}_bytes"] = self._compact(f, size)
                except OSError as e:
                    log.warning("cannot compact %s: %s", f.path, e)
                if f.dropped:
                    stats[f"{f.stream}_dropped_bytes"] = f.dropped
        return stats

    # -- the loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            try:
                trims = self.tick()
            except Exception:
                log.exception("log keeping failed")
                trims = 0
            # A file that had to be cut is written fast: look again sooner, so what it
            # writes between two passes (the cap's overshoot) stays small.
            wait = min(self.interval, FLOOD_INTERVAL) if trims else self.interval

    def tick(self) -> int:
        """One pass over every running program's files (what the thread does each
        interval); returns how many files had to be cut."""
        before = self.trims
        with self._lock:
            handles = list(self._handles)
        connected = self._connected()
        for handle in handles:
            with handle.lock:
                if not handle.active:
                    continue
                try:
                    changed = False
                    for f in handle.files:
                        try:
                            size = os.stat(f.path).st_size
                        except OSError:
                            continue
                        if size == f.seen:
                            continue  # the common case: a quiet program costs one stat
                        changed = True
                        f.seen = size if connected else -1
                        if size - f.head > self.max_bytes:
                            self._trim(f, size)
                            f.seen = -1
                    if changed:
                        self._ship(handle, final=False)
                except OSError as e:
                    log.warning("cannot keep the logs of %s: %s", handle.service_id, e)
        return self.trims - before

    # -- capping ----------------------------------------------------------------------

    def _trim(self, f: _File, size: int) -> None:
        keep = self.max_bytes // 2
        with open(f.path, "r+b") as fh:
            block = max(os.fstat(fh.fileno()).st_blksize, 512)
            end = (size - keep) // block * block  # cuts must be whole blocks
            if end <= f.head:
                return
            for method in [f.method] if f.method else ["collapse", "punch", "truncate"]:
                if self._cut(method, fh.fileno(), f, size, end):
                    f.method = method
                    return

    def _cut(self, method: str, fd: int, f: _File, size: int, end: int) -> bool:
        """Drop the head of ``f`` up to ``end``; False if ``method`` is not supported here."""
        try:
            if method == "collapse":
                fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, 0, end)
                self._dropped(f, end, shift=True)
            elif method == "punch":
                fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, f.head, end - f.head)
                dropped, f.head = end - f.head, end
                self._dropped(f, dropped, shift=False)
            else:
                # Last resort: copy the tail and truncate; output written during these few
                # microseconds may be lost, which is better than a full disk.
                tail = os.pread(fd, size - end, end)
                os.ftruncate(fd, 0)
                os.write(fd, tail)
                self._dropped(f, size - len(tail), shift=True)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return False
            raise
        return True

    def _dropped(self, f: _File, length: int, *, shift: bool) -> None:
        self.trims += 1
        f.dropped += length
        f.ragged = True
        if shift:  # the file's contents moved: what was at ``length`` is at 0 now
            if f.offset < length:
                f.partial = b""
            f.offset = max(0, f.offset - length)
        elif f.offset < f.head:
            f.partial = b""
            f.offset = f.head

    def _compact(self, f: _File, size: int) -> int:
        """Rewrite an ended program's file (``size`` bytes) as a plain tail of at most the
        cap; returns its size."""
        if not f.ragged and size <= self.max_bytes:
            return size
        keep = min(self.max_bytes, size - f.head)
        with open(f.path, "rb") as fh:
            fh.seek(size - keep)
            tail = fh.read(keep)
        cut = tail.find(b"\n")
        if (f.ragged or size - f.head > keep) and 0 <= cut < len(tail) - 1:
            tail = tail[cut + 1:]  # start at a whole line
        tmp = f.path.with_name(f.path.name + ".tmp")
        tmp.write_bytes(tail)
        os.replace(tmp, f.path)
        f.dropped += size - f.head - len(tail)
        f.head, f.ragged = 0, False
        return len(tail)

    # -- shipping ---------------------------------------------------------------------

    def _ship(self, handle: LogHandle, *, final: bool) -> dict[str, int]:
        """Copy new whole lines to Redis; returns the files' sizes."""
        sizes: dict[str, int] = {}
        entries: list[tuple[str, int, bytes]] = []
        connected = self._connected()
        for f in handle.files:
            try:
                size = sizes[f.stream] = f.path.stat().st_size
            except OSError:
                continue
            if not connected:
                continue  # the file keeps the output; its newest part goes once Redis is back
            if size < f.offset:  # rewritten under us; start over at its end
                f.offset, f.partial = size, b""
                continue
            new = size - f.offset
            if new <= 0 and not (final and f.partial):
                continue
            skipped = 0
            if new > SHIP_MAX_BYTES:
                skipped = new - SHIP_MAX_BYTES
                entries.append((NOTE_STREAM, handle.attempt,
                                f"[{skipped} bytes of {f.stream} not copied here; "
                                f"the file keeps its last {self.max_bytes} bytes]".encode()))
                f.offset += skipped
                f.partial = b""
                new = SHIP_MAX_BYTES
            with open(f.path, "rb") as fh:
                data = os.pread(fh.fileno(), new, f.offset)
            f.offset += len(data)
            if skipped:  # landed inside a line: start at the next whole one
                cut = data.find(b"\n")
                data = data[cut + 1:] if cut >= 0 else b""
            data = f.partial + data
            lines = data.split(b"\n")
            f.partial = lines.pop()
            lines = [_shown(line) if b"\r" in line else line for line in lines]
            if b"\r" in f.partial:  # a status line redrawn with \r: ship what it shows now
                done, _, f.partial = f.partial.rpartition(b"\r")
                if shown := _shown(done):
                    lines.append(shown)
            if (final and f.partial) or len(f.partial) > LINE_MAX:
                lines.append(f.partial)
                f.partial = b""
            if len(lines) > SHIP_MAX_LINES:
                entries.append((NOTE_STREAM, handle.attempt,
                                f"[{len(lines) - SHIP_MAX_LINES} lines of {f.stream} "
                                "not copied here]".encode()))
                lines = lines[-SHIP_MAX_LINES:]
            entries.extend((f.stream, handle.attempt, line[:LINE_MAX]) for line in lines)
        if entries:
            handle.shipped += len(entries)
            self._put(LogLines(handle.service_id, entries, self.lines))
        return sizes
