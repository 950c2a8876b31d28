"""The watcher of one service: calls its handler's callbacks while the program runs.

``watch`` runs in the service's own thread: ``before_watch_callback`` once, then
``file_change_callback`` every ``watch_interval`` seconds, and promptly (within
``file_poll`` seconds) when an entry is created, removed or renamed in any directory
of the work dir, and ``after_watch_callback`` exactly once after the program ended.

Changes are noticed by comparing the modification times of the work dir's
directories, a few ``stat`` calls per check. Unlike inotify this also works on
network file systems, costs nothing for programs that finish quickly, and cannot be
flooded by a program that writes a lot. A callback that raises is recorded on the
service and the watcher carries on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from soaf.handler import STOP, WatcherHandler
from soaf.runner import Process
from soaf.service import Service
from soaf.workdir import list_files

log = logging.getLogger(__name__)

#: Shortest gap between two file_change_callback calls triggered by file changes.
MIN_CALLBACK_GAP = 0.05

Check = Callable[[], "str | None"]


def call_callback(service: Service, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one plugin callback; record (never raise) what it raises."""
    try:
        return fn(*args)
    except Exception as e:
        text = f"{name} raised {type(e).__name__}: {e}"
        log.warning("service %s: %s", service.service_id, text, exc_info=True)
        service.record_callback_error(text, traceback.format_exc())
        return None


class DirSignature:
    """Modification times of a work dir's directories, to notice added/removed entries."""

    def __init__(self, work_dir: str) -> None:
        self.work_dir = work_dir
        self.dirs: list[str] = [work_dir]
        self.last = self._read()

    def _read(self) -> tuple[int, ...]:
        out = []
        for path in self.dirs:
            try:
                out.append(os.stat(path).st_mtime_ns)
            except OSError:
                out.append(-1)
        return tuple(out)

    def update_dirs(self, files: list[str]) -> None:
        """Also watch every directory that holds one of ``files``."""
        subdirs = {f.rsplit("/", 1)[0] for f in files if "/" in f}
        self.dirs = [self.work_dir, *(os.path.join(self.work_dir, d) for d in sorted(subdirs))]
        self.last = self._read()

    def changed(self) -> bool:
        now = self._read()
        if now != self.last:
            self.last = now
            return True
        return False


def watch(
    handler: WatcherHandler,
    service: Service,
    process: Process,
    *,
    wake: threading.Event,
    check: Check,
    file_poll: float,
) -> tuple[str | None, list[str]]:
    """Follow ``process`` until it exits; return (what stopped it early, final files).

    ``check`` is called after every wait; when it returns a reason (``"timed_out"``,
    ``"cancelled"``) watching stops so that the caller can stop the program. ``wake``
    is set when the program exits or a cancel arrives.
    """
    interval = float(service.template.watch_interval)
    signature = DirSignature(str(service.work_dir)) if file_poll > 0 else None
    call_callback(service, "before_watch_callback", handler.before_watch_callback, service)
    watching = True
    reason: str | None = None
    while not process.exited.is_set() and reason is None:
        if watching and not service.stop_requested.is_set():
            files = list_files(service.work_dir)
            if signature is not None:
                signature.update_dirs(files)
            last_call = time.monotonic()
            result = call_callback(
                service, "file_change_callback", handler.file_change_callback, service, files
            )
            watching = result is not STOP
        else:
            watching = False
        next_call = last_call + interval
        # Wait for: the next interval, a change in the work dir, the exit, or a reason.
        while not process.exited.is_set():
            now = time.monotonic()
            if watching and now >= next_call:
                break
            step = min(next_call - now, file_poll) if watching and file_poll > 0 else (
                next_call - now if watching else 0.5)
            if wake.wait(max(step, 0.001)):
                wake.clear()
            reason = check()
            if reason is not None:
                break
            if (
                watching
                and signature is not None
                and time.monotonic() - last_call >= MIN_CALLBACK_GAP
                and signature.changed()
            ):
                break
    files = list_files(service.work_dir)
    return reason, files
