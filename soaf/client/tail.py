"""Reading a service's output files (``stdout.log``, ``stderr.log``) from its work dir, on this host.

A program's output files stay in its work dir on the core's machine; the record says
where (``work_dir``). Clients read a service's output from Redis (soaf/client/logstream.py)
and come here only when Redis has no copy of it, and only where the work dir is
visible: the core's machine, or one that sees the work root through a shared file
system at the same path.

The core caps these files in place (soaf.core.logkeeper): on tmpfs or btrfs by
punching a hole at the head, which keeps the file's size and reads back as NUL bytes.
The hole is skipped (``SEEK_DATA``) and no line read here ever holds a NUL byte.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from soaf.protocol.state import ServiceRecord

#: Output files of a service's program, by stream name.
OUTPUT_FILES = {"stdout": "stdout.log", "stderr": "stderr.log"}
#: Bytes read per step when looking for the last lines of a file.
_CHUNK = 64 * 1024


def check_stream(stream: str) -> str:
    """``stream`` if it names a program's output; ValueError otherwise."""
    if stream not in OUTPUT_FILES:
        raise ValueError(f"stream must be one of {', '.join(OUTPUT_FILES)}, got {stream!r}")
    return stream


def local_output(record: ServiceRecord, stream: str = "stdout") -> Path | None:
    """The file holding ``stream`` of the service, when its work dir is on this host;
    None while it has no work dir yet, or when the work dir is on another machine."""
    work_dir = record.get("work_dir")
    if not work_dir:
        return None
    path = Path(work_dir)
    return path / OUTPUT_FILES[check_stream(stream)] if path.is_dir() else None


class OutputFile:
    """Lines of one output file: its last lines, then whatever is appended.

    A file that shrinks (the core keeps only the tail of a large output) is read again
    from its start; a punched head is skipped, and NUL bytes never reach a line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._partial = b""
        self._inode: int | None = None

    def _size(self) -> int:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0
        if self._inode is not None and st.st_ino != self._inode:
            self._pos, self._partial = 0, b""  # replaced: read the new file from its start
        self._inode = st.st_ino
        return st.st_size

    def tail(self, lines: int | None) -> list[str]:
        """The last ``lines`` complete lines (all when None); later reads continue after them."""
        size = self._size()
        if lines is None:
            return self.new_lines()
        start = size
        data = b""
        with _open(self.path) as f:
            if f is None:
                return []
            first = _data_start(f, 0, size)
            while start > first and data.count(b"\n") <= lines:
                step = min(_CHUNK, start - first)
                start -= step
                f.seek(start)
                data = f.read(step) + data
        end = data.rfind(b"\n") + 1
        self._pos = start + end
        self._partial = b""
        kept = _clean(data[:end].splitlines())
        return kept[-lines:] if lines > 0 else []

    def new_lines(self, *, final: bool = False) -> list[str]:
        """Complete lines appended since the last call; with ``final`` also a last partial one."""
        size = self._size()
        if size < self._pos:
            self._pos, self._partial = 0, b""
        data = b""
        if size > self._pos:
            with _open(self.path) as f:
                if f is not None:
                    start = _data_start(f, self._pos, size)
                    f.seek(start)
                    data = f.read(size - start)
                    self._pos = start + len(data)
        data = self._partial + data
        end = data.rfind(b"\n") + 1
        lines, self._partial = data[:end].splitlines(), data[end:]
        if final and self._partial:
            lines.append(self._partial)
            self._partial = b""
        return _clean(lines)


def _data_start(f: BinaryIO, pos: int, size: int) -> int:
    """The first offset at or after ``pos`` that holds data rather than a hole (``size``
    when only a hole follows); ``pos`` where the file system cannot tell."""
    if pos >= size:
        return pos
    try:
        return min(os.lseek(f.fileno(), pos, os.SEEK_DATA), size)
    except OSError as e:
        if e.errno == errno.ENXIO:  # nothing but a hole up to the end
            return size
        return pos  # SEEK_DATA not supported: the NULs are dropped by _clean


def _clean(lines: list[bytes]) -> list[str]:
    """Decoded lines without NUL bytes; a line made only of NULs (part of a hole) is dropped."""
    out: list[str] = []
    for line in lines:
        if b"\0" in line:
            line = line.replace(b"\0", b"")
            if not line:
                continue
        out.append(line.decode(errors="replace"))
    return out


@contextlib.contextmanager
def _open(path: Path) -> Iterator[BinaryIO | None]:
    """``open(path, 'rb')`` that gives None for a file that does not exist (yet)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        yield None
        return
    with f:
        yield f
