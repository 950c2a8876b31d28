"""Reading a service's output (``stdout.log``, ``stderr.log``) from its work dir, on this host.

A program's output stays in its work dir on the core's machine; the record says where
(``work_dir``). A client on the same machine, or one that sees the work root through a
shared file system at the same path, reads the files directly. Anywhere else the
output is not reachable and ``LogsUnavailable`` says which node holds it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from soaf.errors import LogsUnavailable
from soaf.protocol.state import ServiceRecord

#: Output files of a service's program, by stream name.
OUTPUT_FILES = {"stdout": "stdout.log", "stderr": "stderr.log"}
#: Bytes read per step when looking for the last lines of a file.
_CHUNK = 64 * 1024


def output_path(record: ServiceRecord, stream: str = "stdout") -> Path | None:
    """The file holding ``stream`` of the service; None while it has no work dir yet.

    LogsUnavailable when the work dir is on a machine this client cannot see.
    """
    if stream not in OUTPUT_FILES:
        raise ValueError(f"stream must be one of {', '.join(OUTPUT_FILES)}, got {stream!r}")
    work_dir = record.get("work_dir")
    if not work_dir:
        return None
    path = Path(work_dir)
    if not path.is_dir():
        raise LogsUnavailable(
            f"the output of {record.service_id} is in {work_dir} on node {record.node}, "
            "which this machine cannot see; read it there"
        )
    return path / OUTPUT_FILES[stream]


class OutputFile:
    """Lines of one output file: its last lines, then whatever is appended.

    A file that shrinks (the core keeps only the tail of a large output) is read again
    from its start.
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
            while start > 0 and data.count(b"\n") <= lines:
                step = min(_CHUNK, start)
                start -= step
                f.seek(start)
                data = f.read(step) + data
        end = data.rfind(b"\n") + 1
        self._pos = start + end
        self._partial = b""
        kept = data[:end].splitlines()
        return [line.decode(errors="replace") for line in kept[-lines:]] if lines > 0 else []

    def new_lines(self, *, final: bool = False) -> list[str]:
        """Complete lines appended since the last call; with ``final`` also a last partial one."""
        size = self._size()
        if size < self._pos:
            self._pos, self._partial = 0, b""
        data = b""
        if size > self._pos:
            with _open(self.path) as f:
                if f is not None:
                    f.seek(self._pos)
                    data = f.read(size - self._pos)
                    self._pos += len(data)
        data = self._partial + data
        end = data.rfind(b"\n") + 1
        lines, self._partial = data[:end].splitlines(), data[end:]
        if final and self._partial:
            lines.append(self._partial)
            self._partial = b""
        return [line.decode(errors="replace") for line in lines]


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
