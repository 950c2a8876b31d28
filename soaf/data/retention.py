"""Recycling work dirs: the sweep that applies the retention policy to a work root.

The sweep (``soaf gc``, and a core's periodic ``Sweeper``) reads only the run markers
(soaf/data/markers.py) and the file system, so it works without Redis and on any work root:

- a dir is touched only when every run that used it has finished (a shared
  ``work_path`` stays while any service uses it); a ``running`` marker whose core is
  gone from this host counts as failed; a dir without markers is not soaf's to remove;
- a succeeded dir older than ``keep_succeeded_hours`` is removed, trimmed to its
  outputs and logs, or kept (``on_success``); a failed one goes after
  ``keep_failed_hours``; over ``max_bytes`` the oldest finished dirs go first;
- each removal re-checks the markers under an exclusive ``flock`` of
  ``.soaf/gc.lock``, which every service start holds shared while it writes its marker
  and creates its dir, so a dir is never removed under a service that just took it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaf.config import RetentionPolicy, host_name
from soaf.data.markers import Marker, abandoned, meta_dir, read_markers, work_root_lock, write_marker
from soaf.protocol.state import State

log = logging.getLogger(__name__)

#: Files kept beside the outputs when a succeeded dir is trimmed (``on_success=outputs``).
KEEP_WITH_OUTPUTS = ("stdout.log", "stderr.log")


@dataclass
class SweepReport:
    """What one sweep did (or, with ``dry_run``, would do)."""

    removed: list[dict[str, Any]] = field(default_factory=list)
    trimmed: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    freed: int = 0
    total_before: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class _Dir:
    name: str
    path: Path
    markers: list[Marker]
    failed: bool = False
    finished_at: float = 0.0
    size: int = 0


def du(path: Path) -> int:
    """Bytes in the regular files below ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_size
    return total


InUse = Callable[[], "set[Path]"]


def sweep(work_root: Path, policy: RetentionPolicy, *, in_use: InUse | None = None,
          now: float | None = None, dry_run: bool = False) -> SweepReport:
    """Apply ``policy`` to the finished work dirs under ``work_root``.

    ``in_use`` returns the (resolved) work dirs this process is running services in;
    they are never touched whatever their markers say. ``now`` is for tests.
    """
    now = time.time() if now is None else now
    report = SweepReport(dry_run=dry_run)
    root = work_root.resolve()
    if not root.is_dir():
        return report
    report.total_before = du(root)
    dirs = _finished_dirs(root, report, now, in_use)
    survivors: list[_Dir] = []
    for d in dirs:
        age = now - d.finished_at
        if d.failed:
            if age >= policy.keep_failed_hours * 3600:
                _remove(root, d, report, "failed", in_use, dry_run)
                continue
        elif age >= policy.keep_succeeded_hours * 3600:
            if policy.on_success == "remove":
                _remove(root, d, report, "succeeded", in_use, dry_run)
                continue
            if policy.on_success == "outputs" and not all(m.trimmed for m in d.markers):
                _trim(root, d, report, in_use, dry_run)
        survivors.append(d)
    if policy.max_bytes:
        total = report.total_before - report.freed
        survivors.sort(key=lambda d: (d.failed, d.finished_at))
        for d in survivors:
            if total <= policy.max_bytes:
                break
            d.size = du(d.path)
            if _remove(root, d, report, "over max_bytes", in_use, dry_run):
                total -= d.size
    for d in survivors:
        if not any(r["dir"] == d.name for r in report.removed):
            report.kept.append({"dir": d.name, "reason": "failed" if d.failed else "succeeded"})
    return report


def _finished_dirs(root: Path, report: SweepReport, now: float,
                   in_use: InUse | None) -> list[_Dir]:
    host = host_name()
    groups: dict[str, list[Marker]] = {}
    for marker in read_markers(root):
        groups.setdefault(marker.work_dir, []).append(marker)
    busy = {p.resolve() for p in in_use()} if in_use else set()
    names = [n for n in groups if n]
    out: list[_Dir] = []
    for name, markers in groups.items():
        path = root / name
        if not name or name.startswith(".."):
            continue  # a marker being written; its dir is in use
        if any(n != name and (n.startswith(name + "/") or name.startswith(n + "/")) for n in names):
            report.kept.append({"dir": name, "reason": "nested work paths"})
            continue
        if not path.exists():
            if all(m.final or abandoned(m, host) for m in markers):
                for m in markers:
                    _unlink_marker(m)
            continue
        if path.resolve() in busy or any(not m.final and not abandoned(m, host) for m in markers):
            report.kept.append({"dir": name, "reason": "in use"})
            continue
        finished = [m.finished_at or _mtime(m) for m in markers]
        failed = any(m.state != State.SUCCEEDED.value for m in markers)
        out.append(_Dir(name, path, markers, failed=failed, finished_at=max(finished, default=now)))
    out.sort(key=lambda d: d.finished_at)
    return out


def _mtime(marker: Marker) -> float:
    try:
        return marker.path.stat().st_mtime if marker.path else 0.0
    except OSError:
        return 0.0


def _unlink_marker(marker: Marker) -> None:
    if marker.path is not None:
        with contextlib.suppress(FileNotFoundError):
            marker.path.unlink()


def _still_finished(root: Path, d: _Dir, in_use: InUse | None) -> bool:
    """Under the exclusive lock: has nobody taken the dir since the sweep looked?"""
    host = host_name()
    now_markers = [m for m in read_markers(root) if m.work_dir == d.name or not m.work_dir]
    if any(not m.final and not abandoned(m, host) for m in now_markers):
        return False
    if {m.service_id for m in now_markers} != {m.service_id for m in d.markers}:
        return False
    busy = {p.resolve() for p in in_use()} if in_use else set()
    return d.path.resolve() not in busy


def _remove(root: Path, d: _Dir, report: SweepReport, reason: str, in_use: InUse | None,
            dry_run: bool) -> bool:
    size = d.size or du(d.path)
    if dry_run:
        report.removed.append({"dir": d.name, "bytes": size, "reason": reason})
        report.freed += size
        return True
    trash = meta_dir(root) / "trash" / uuid.uuid4().hex
    with work_root_lock(root, exclusive=True):
        if not _still_finished(root, d, in_use):
            report.kept.append({"dir": d.name, "reason": "taken again"})
            return False
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(d.path, trash)
        for m in d.markers:
            _unlink_marker(m)
    shutil.rmtree(trash, ignore_errors=True)
    report.removed.append({"dir": d.name, "bytes": size, "reason": reason})
    report.freed += size
    log.info("removed work dir %s (%s, %d bytes)", d.name, reason, size)
    return True


def _trim(root: Path, d: _Dir, report: SweepReport, in_use: InUse | None,
          dry_run: bool) -> None:
    keep = {name for m in d.markers for name in m.outputs} | set(KEEP_WITH_OUTPUTS)
    victims = [p for p in _files(d.path) if p.relative_to(d.path).as_posix() not in keep]
    size = sum(p.lstat().st_size for p in victims)
    if not dry_run:
        with work_root_lock(root, exclusive=True):
            if not _still_finished(root, d, in_use):
                return
            for p in victims:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            _prune_empty(d.path)
            for m in d.markers:
                m.trimmed = True
                if m.path is not None:
                    write_marker(m.path, m)
        log.info("trimmed work dir %s to its outputs (%d bytes freed)", d.name, size)
    report.trimmed.append({"dir": d.name, "bytes": size})
    report.freed += size


def _files(path: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, _dirs, names in os.walk(path):
        out.extend(Path(dirpath) / n for n in names)
    return out


def _prune_empty(path: Path) -> None:
    for dirpath, _dirs, _names in sorted(os.walk(path), key=lambda t: -len(t[0])):
        if dirpath != str(path):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


class Sweeper:
    """A core's periodic sweep: at start, then every ``interval`` seconds (0: never)."""

    def __init__(self, work_root: Path, policy: RetentionPolicy, *, interval: float,
                 in_use: InUse) -> None:
        self.work_root = work_root
        self.policy = policy
        self.interval = interval
        self.in_use = in_use
        self.sweeps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soaf-gc", daemon=True)

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                report = sweep(self.work_root, self.policy, in_use=self.in_use)
                if report.removed or report.trimmed:
                    log.info("work root sweep: removed %d dirs, trimmed %d, freed %d bytes",
                             len(report.removed), len(report.trimmed), report.freed)
            except Exception:
                log.exception("work root sweep failed; trying again in %g s", self.interval)
            self.sweeps += 1
            self._stop.wait(self.interval)
