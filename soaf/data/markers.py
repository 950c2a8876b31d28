"""Run markers: which service used which work dir under a work root, and how it ended.

Every run leaves ``<work root>/.soaf/runs/<service_id>.json``: written as ``running``
(with the core's host and pid) before its work dir is created or re-used, rewritten with
the final state and output names when it ends. The sweep (soaf/data/retention.py) decides on
these alone, so it needs no Redis. ``work_root_lock`` makes "take a dir" (shared) and
"remove a dir" (exclusive) exclude each other, across threads and processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from soaf.config import host_name
from soaf.process.identity import pid_exists
from soaf.protocol.state import FINAL_VALUES, encode_json
from soaf.protocol.template import RESERVED_WORK_NAME

log = logging.getLogger(__name__)

RUNNING = "running"
#: Seconds after which a marker that cannot be parsed is taken as damaged, not in progress.
DAMAGED_AFTER = 60.0


def meta_dir(work_root: Path) -> Path:
    return work_root / RESERVED_WORK_NAME


def runs_dir(work_root: Path) -> Path:
    return meta_dir(work_root) / "runs"


@contextlib.contextmanager
def work_root_lock(work_root: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold ``.soaf/gc.lock``: shared while a service takes a dir, exclusive to remove one.

    The lock file is opened per use: flock locks belong to an open file, so threads of one
    process exclude each other only through separate opens.
    """
    path = f"{work_root}/{RESERVED_WORK_NAME}/gc.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        meta_dir(work_root).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class Marker:
    """What the sweep knows of one run from its marker file."""

    service_id: str
    work_dir: str  # relative to the work root
    state: str = RUNNING
    host: str | None = None
    pid: int | None = None
    started_at: float = 0.0
    finished_at: float | None = None
    outputs: list[str] = field(default_factory=list)
    trimmed: bool = False
    path: Path | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_VALUES

    def to_json(self) -> str:
        data = dict(vars(self))
        del data["path"]
        return encode_json(data)  # json.dumps's text, without an encoder made per call


def write_marker(path: Path, marker: Marker) -> None:
    # One write, no temp file: a reader that sees a half-written marker cannot parse it
    # and treats the dir as in use, which is the safe side.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, marker.to_json().encode())
    finally:
        os.close(fd)


def mark_started(work_root: Path, service_id: str, work_name: str) -> Marker:
    """Record that this process uses ``<work_root>/<work_name>`` for ``service_id``; call
    under the shared lock, before the dir is created. Keep the marker for ``mark_finished``."""
    path = Path(f"{work_root}/{RESERVED_WORK_NAME}/runs/{service_id}.json")
    marker = Marker(service_id, work_name, host=host_name(), pid=os.getpid(),
                    started_at=time.time(), path=path)
    try:
        write_marker(path, marker)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_marker(path, marker)
    return marker


def mark_finished(marker: Marker, state: str, outputs: list[str] | None = None) -> None:
    """Record the final state (and output names, kept by ``on_success=outputs``)."""
    assert marker.path is not None
    marker.state = state
    marker.finished_at = time.time()
    marker.outputs = list(outputs or [])
    write_marker(marker.path, marker)


def mark_set_aside(work_root: Path, work_name: str, state: str) -> Marker:
    """Record a failed attempt's dir that a retry set aside (``<dir>.attempt<N>``) as a
    finished run of its own, so the sweep recycles it like any failed dir."""
    path = Path(f"{work_root}/{RESERVED_WORK_NAME}/runs/{work_name}.json")
    now = time.time()
    marker = Marker(work_name, work_name, state=state, host=host_name(),
                    pid=os.getpid(), started_at=now, finished_at=now, path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_marker(path, marker)
    return marker


def read_marker(path: Path) -> Marker | None:
    """The marker in ``path``; None when it is gone, or unreadable for longer than a write takes."""
    try:
        data = json.loads(path.read_text())
        marker = Marker(**{k: v for k, v in data.items() if k in Marker.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # Being written right now: in use until proven otherwise. One that stays
        # unreadable (a crash mid-write) is ignored after a while, not obeyed forever.
        try:
            stale = time.time() - path.stat().st_mtime > DAMAGED_AFTER
        except OSError:
            return None
        if stale:
            log.warning("ignoring the unreadable marker %s", path)
            return None
        marker = Marker(path.stem, "", state=RUNNING)
    marker.path = path
    return marker


def read_markers(work_root: Path) -> list[Marker]:
    directory = runs_dir(work_root)
    if not directory.is_dir():
        return []
    return [m for p in sorted(directory.glob("*.json")) if (m := read_marker(p)) is not None]


def abandoned(marker: Marker, host: str) -> bool:
    """A ``running`` marker whose core process is gone from this host."""
    return (not marker.final and marker.host == host and isinstance(marker.pid, int)
            and marker.pid != os.getpid() and not pid_exists(marker.pid))
