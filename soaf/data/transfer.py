"""Copying by chunks that a stop request can end: the shared step of staging and collection.

A transfer checks its ``stop`` callable (the run is cancelled, the core stops) between
two chunks and raises ``TransferStopped`` instead of writing on, so nothing is written
into a work dir or an output target after its service has ended.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from soaf.errors import TransferStopped

#: Bytes copied per read.
CHUNK = 1024 * 1024

#: True once a transfer must stop (a cancel, the core stopping): checked between chunks.
Stop = Callable[[], bool]


def check_stop(stop: Stop | None) -> None:
    """TransferStopped if ``stop()`` says the transfer must end."""
    if stop is not None and stop():
        raise TransferStopped("stopped: the service was cancelled or its core is stopping")


def copy_file(source: Path | str, target: Path | str, *, stop: Stop | None = None) -> None:
    """Copy one regular file by chunks, checking ``stop`` between them; the source is
    opened without blocking and must be a regular file (a FIFO would never end)."""
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as src:
        mode = os.fstat(src.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{source} is not a regular file")
        with open(target, "wb") as out:
            for chunk in chunks(src, stop):
                out.write(chunk)


def chunks(src: BinaryIO, stop: Stop | None = None) -> Iterator[bytes]:
    """``src`` read by chunks, checking ``stop`` before each one."""
    while True:
        check_stop(stop)
        chunk = src.read(CHUNK)
        if not chunk:
            return
        yield chunk


def put_file(fs: Any, source: Path | str, remote: str, *, stop: Stop | None = None) -> None:
    """Upload one local file to ``remote`` on the fsspec file system ``fs`` by chunks,
    checking ``stop`` between them. A stopped upload is discarded where the file system
    can (an object store's multipart upload is aborted) and the partial file removed,
    so nothing is written for a service after its end."""
    with open(source, "rb") as src:
        out = fs.open(remote, "wb")
        try:
            for chunk in chunks(src, stop):
                out.write(chunk)
        except BaseException:
            _abandon(out)
            with contextlib.suppress(Exception):
                if fs.exists(remote):
                    fs.rm_file(remote)
            raise
        out.close()


def _abandon(out: Any) -> None:
    """Close a file being uploaded without committing it: a buffered fsspec file is
    discarded (an object store aborts its multipart upload) and marked closed, so
    neither ``close`` nor its finalizer uploads what was buffered."""
    from fsspec.spec import AbstractBufferedFile

    if isinstance(out, AbstractBufferedFile):
        with contextlib.suppress(Exception):
            out.discard()
        out.closed = True
    else:
        with contextlib.suppress(Exception):
            out.close()
