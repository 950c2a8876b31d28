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
  and creates its dir, so a dir is never removed under a service that just took it
  (soaf.data.holds: the lock is taken once per batch of dirs, not once per dir).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaf.config import RetentionPolicy, host_name
from soaf.data.holds import Hold, Holds, InUse, identities, identity
from soaf.data.markers import Marker, abandoned, read_markers, write_marker
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


def sweep(work_root: Path, policy: RetentionPolicy, *, in_use: InUse | None = None,
          now: float | None = None, dry_run: bool = False, measure: bool = True) -> SweepReport:
    """Apply ``policy`` to the finished work dirs under ``work_root``.

    ``in_use`` returns the (resolved) work dirs this process is running services in;
    they are never touched whatever their markers say. ``now`` is for tests. ``measure``
    totals the bytes under the root first (``total_before``; always with ``max_bytes``):
    a core's periodic sweep does without that walk of every file.

    What the sweep removes or trims is checked again, and done, under the exclusive
    work-root lock, taken once for up to ``HOLD_DIRS`` dirs (soaf.data.holds): a service
    starting meanwhile waits for one such hold at most.
    """
    now = time.time() if now is None else now
    report = SweepReport(dry_run=dry_run)
    root = work_root.resolve()
    if not root.is_dir():
        return report
    if measure or policy.max_bytes:
        report.total_before = du(root)
    seen, dirs = _finished_dirs(root, report, now, in_use)
    expired: list[tuple[_Dir, str]] = []
    trims: list[tuple[_Dir, list[Path], int]] = []
    survivors: list[_Dir] = []
    for d in dirs:
        age = now - d.finished_at
        if d.failed:
            if age >= policy.keep_failed_hours * 3600:
                d.size = du(d.path)
                expired.append((d, "failed"))
                continue
        elif age >= policy.keep_succeeded_hours * 3600:
            if policy.on_success == "remove":
                d.size = du(d.path)
                expired.append((d, "succeeded"))
                continue
            if policy.on_success == "outputs" and not all(m.trimmed for m in d.markers):
                trims.append((d, *_victims(d)))
        survivors.append(d)
    capped = bool(policy.max_bytes) and report.total_before > policy.max_bytes
    holds = Holds(root, seen, in_use, dry_run=dry_run)
    for hold, (d, victims, size) in holds.each(trims):
        _trim(d, victims, size, report, hold)
    for hold, (d, reason) in holds.each(expired):
        _remove(d, reason, report, hold)
    if capped:
        survivors.sort(key=lambda d: (d.failed, d.finished_at))

        def under() -> bool:
            return report.total_before - report.freed <= policy.max_bytes

        for hold, d in holds.each(survivors, until=under):
            d.size = du(d.path)
            _remove(d, "over max_bytes", report, hold)
    removed = {r["dir"] for r in report.removed}
    for d in survivors:
        if d.name not in removed:
            report.kept.append({"dir": d.name, "reason": "failed" if d.failed else "succeeded"})
    return report


def _finished_dirs(root: Path, report: SweepReport, now: float,
                   in_use: InUse | None) -> tuple[set[str], list[_Dir]]:
    """The names of the marker files read (those that could be read), and the dirs whose
    every run has finished, oldest first."""
    host = host_name()
    groups: dict[str, list[Marker]] = {}
    seen: set[str] = set()
    for marker in read_markers(root):
        groups.setdefault(marker.work_dir, []).append(marker)
        if marker.work_dir and marker.path is not None:
            seen.add(marker.path.name)
    busy = identities(in_use()) if in_use else set()
    nested = _nested(n for n in groups if n)
    out: list[_Dir] = []
    for name, markers in groups.items():
        path = root / name
        if not name or name.startswith(".."):
            continue  # a marker being written; its dir is in use
        if name in nested:
            report.kept.append({"dir": name, "reason": "nested work paths"})
            continue
        found = identity(path)
        if found is None:
            if all(m.final or abandoned(m, host) for m in markers):
                for m in markers:
                    _unlink_marker(m)
            continue
        if found in busy or any(not m.final and not abandoned(m, host) for m in markers):
            report.kept.append({"dir": name, "reason": "in use"})
            continue
        finished = [m.finished_at or _mtime(m) for m in markers]
        failed = any(m.state != State.SUCCEEDED.value for m in markers)
        out.append(_Dir(name, path, markers, failed=failed, finished_at=max(finished, default=now)))
    out.sort(key=lambda d: d.finished_at)
    return seen, out


def _nested(names: Iterable[str]) -> set[str]:
    """The work dir names that lie inside another one's dir, or hold another one: such
    dirs are never swept (removing the outer one would take the inner one along). Each
    name's parents are looked up, so a root with tens of thousands of dirs costs a set
    lookup per path component, not a comparison of every name with every other."""
    present = set(names)
    found: set[str] = set()
    for name in present:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in present:
                found.update((name, parent))
    return found


def _mtime(marker: Marker) -> float:
    try:
        return marker.path.stat().st_mtime if marker.path else 0.0
    except OSError:
        return 0.0


def _unlink_marker(marker: Marker) -> None:
    if marker.path is not None:
        with contextlib.suppress(FileNotFoundError):
            marker.path.unlink()


def _remove(d: _Dir, reason: str, report: SweepReport, hold: Hold) -> bool:
    if not hold.still_free(d.name, d.path, d.markers):
        report.kept.append({"dir": d.name, "reason": "taken again"})
        return False
    if not hold.dry_run:
        if not hold.trash(d.path):
            return False  # gone meanwhile: the next sweep forgets its markers
        for m in d.markers:
            _unlink_marker(m)
        log.info("removed work dir %s (%s, %d bytes)", d.name, reason, d.size)
    report.removed.append({"dir": d.name, "bytes": d.size, "reason": reason})
    report.freed += d.size
    return True


def _victims(d: _Dir) -> tuple[list[Path], int]:
    """The files trimming ``d`` removes (all but its outputs and logs), and their bytes."""
    keep = {name for m in d.markers for name in m.outputs} | set(KEEP_WITH_OUTPUTS)
    victims = [p for p in _files(d.path) if p.relative_to(d.path).as_posix() not in keep]
    return victims, sum(p.lstat().st_size for p in victims)


def _trim(d: _Dir, victims: list[Path], size: int, report: SweepReport, hold: Hold) -> None:
    if not hold.still_free(d.name, d.path, d.markers):
        return
    if not hold.dry_run:
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
                report = sweep(self.work_root, self.policy, in_use=self.in_use, measure=False)
                if report.removed or report.trimmed:
                    log.info("work root sweep: removed %d dirs, trimmed %d, freed %d bytes",
                             len(report.removed), len(report.trimmed), report.freed)
            except Exception:
                log.exception("work root sweep failed; trying again in %g s", self.interval)
            self.sweeps += 1
            self._stop.wait(self.interval)
