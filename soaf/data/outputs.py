"""Collecting results: check a work dir against ``output_files``, checksum, copy to a target.

``collect_outputs`` expands the template's patterns (globs allowed; a match that is a
directory stands for every file below it; only regular files, no links followed under a
wildcard, within the bounds of soaf.data.matching) and fails with ``MissingOutputError`` listing
each required pattern that matched nothing; ``optional_outputs`` are taken when present.
``upload_outputs`` copies the collected files to ``output_target``: a directory on the
core's machine, or any URL fsspec can write. Each file is written under a temporary name
and renamed where the target can rename, so a half-copied result never looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soaf.config import DEFAULT_FETCH_TIMEOUT
from soaf.data.matching import Matcher, kind_of
from soaf.data.staging import (
    install,
    local_path,
    open_fs,
    redact,
    scheme,
    temp_name,
)
from soaf.data.transfer import Stop, check_stop, chunks, copy_file, put_file
from soaf.errors import MissingOutputError, TransferStopped, UploadError
from soaf.protocol.template import ServiceParamTemplate, is_url

log = logging.getLogger(__name__)

#: fsspec protocols whose ``mv`` is a cheap rename: uploads there go through a temp name.
#: (On object stores a move is a second full copy, so files are written in place.)
RENAMING_PROTOCOLS = frozenset({"file", "local", "ftp", "sftp", "ssh", "memory"})


@dataclass
class Output:
    """One collected output file, as recorded on the service record under ``outputs``."""

    name: str
    size: int
    sha256: str
    url: str | None = None

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "size": self.size, "sha256": self.sha256}
        if self.url is not None:
            out["url"] = self.url
        return out


def sha256_of(path: Path, *, stop: Stop | None = None) -> tuple[int, str]:
    """(size, sha256) of the regular file at ``path``; OSError if it is none. Opened
    without blocking, so a file swapped for a FIFO cannot hang the reader."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is {kind_of(st.st_mode)}, not a regular file")
        digest = hashlib.sha256()
        for chunk in chunks(f, stop):
            digest.update(chunk)
    return st.st_size, digest.hexdigest()


def collect_outputs(work_dir: Path, required: list[str] | tuple[str, ...],
                    optional: list[str] | tuple[str, ...] = (), *, stop: Stop | None = None,
                    notes: list[str] | None = None) -> list[Output]:
    """Every regular file the patterns name, with its size and sha256; MissingOutputError
    if a required pattern matched nothing, OutputLimitError past the bounds of
    soaf.data.matching, TransferStopped as soon as ``stop()`` is true. Why files were
    skipped (a FIFO, a link under a wildcard ...) is appended to ``notes``."""
    matcher = Matcher(work_dir, stop=stop)
    names: dict[str, None] = {}
    missing: list[str] = []
    try:
        for pattern in required:
            matched = matcher.match(pattern)
            if not matched:
                missing.append(pattern)
            names.update(dict.fromkeys(matched))
        if missing:
            raise MissingOutputError(missing)
        for pattern in optional:
            names.update(dict.fromkeys(matcher.match(pattern)))
    finally:
        if notes is not None:
            notes.extend(matcher.notes)
            if matcher.skipped > len(matcher.notes):
                notes.append(f"... and {matcher.skipped - len(matcher.notes)} more skipped")
    root = work_dir.resolve()
    outputs = []
    for name in sorted(names):
        try:
            size, digest = sha256_of(root / name, stop=stop)
        except TransferStopped:
            raise
        except OSError as e:
            log.warning("output %s not collected: %s", name, e)
            if notes is not None:
                notes.append(f"{name!r} could not be read ({e}); skipped")
            continue
        outputs.append(Output(name, size, digest))
    return outputs


def expand_target(target: str, template: ServiceParamTemplate) -> str:
    """``output_target`` with ``{service_id}`` and ``{service}`` filled in."""
    return target.replace("{service_id}", template.service_id).replace(
        "{service}", template.service
    )


def upload_outputs(work_dir: Path, outputs: list[Output], target: str, *,
                   timeout: float = DEFAULT_FETCH_TIMEOUT, stop: Stop | None = None) -> None:
    """Copy each output to ``target`` (same relative names); sets each ``url``. A true
    ``stop()`` ends the copy between two chunks (TransferStopped), its partial file removed."""
    root = work_dir.resolve()
    try:
        if not is_url(target) or scheme(target) == "file":
            _copy_to_dir(root, outputs, local_path(target), stop)
        else:
            _put_to_fs(root, outputs, target, timeout=timeout, stop=stop)
    except (UploadError, TransferStopped):
        raise
    except Exception as e:
        text = str(e) or type(e).__name__
        raise UploadError(f"cannot copy outputs to {redact(target)}: {text}") from e
    shown = redact(target).rstrip("/")
    for output in outputs:
        output.url = f"{shown}/{output.name}"


def _copy_to_dir(root: Path, outputs: list[Output], directory: Path, stop: Stop | None) -> None:
    check_stop(stop)
    directory.mkdir(parents=True, exist_ok=True)
    base = directory.resolve()
    for output in outputs:
        check_stop(stop)
        destination = base / output.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(destination)
        try:
            copy_file(root / output.name, tmp, stop=stop)
            check_stop(stop)
            install(tmp, destination)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        log.debug("copied output %s to %s", output.name, destination)


def _put_to_fs(root: Path, outputs: list[Output], target: str, *, timeout: float,
               stop: Stop | None) -> None:
    fs, base = open_fs(target, timeout=timeout)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    renames = any(p in RENAMING_PROTOCOLS for p in protocols)
    base = base.rstrip("/")
    made: set[str] = set()
    for output in outputs:
        check_stop(stop)
        remote = posixpath.join(base, output.name)
        parent = posixpath.dirname(remote)
        if parent and parent not in made:
            fs.makedirs(parent, exist_ok=True)
            made.add(parent)
        if renames:
            tmp = posixpath.join(parent, f".{posixpath.basename(remote)}.{os.getpid()}.part")
            put_file(fs, root / output.name, tmp, stop=stop)
            if fs.exists(remote):
                fs.rm_file(remote)
            fs.mv(tmp, remote)
        else:
            put_file(fs, root / output.name, remote, stop=stop)
        log.debug("uploaded output %s to %s", output.name, redact(target))
