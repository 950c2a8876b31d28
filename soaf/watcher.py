"""The watcher of one service: calls its handler's callbacks while the program runs.

``watch`` runs in the service's own thread: ``before_watch_callback`` once, then
``file_change_callback`` every ``watch_interval`` seconds and promptly when the
``WorkRootMonitor`` sees a file appear, close or move in the work dir, and
``after_watch_callback`` exactly once after the program has ended. A callback that
raises is recorded on the service and the watcher carries on.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from soaf.handler import STOP, WatcherHandler
from soaf.runner import Process
from soaf.service import Service
from soaf.workdir import list_files

log = logging.getLogger(__name__)

#: Shortest gap between two file_change_callback calls triggered by file events.
MIN_CALLBACK_GAP = 0.05


class WorkRootMonitor(FileSystemEventHandler):
    """One watchdog observer for the whole work root; wakes the watchers of changed dirs.

    Only creations, deletions, moves and closes-after-write are watched (no per-write
    events), so a chatty program does not flood the core.
    """

    def __init__(self, work_root: Path) -> None:
        self.work_root = work_root.resolve()
        self._wakers: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._observer: Any = None

    def start(self) -> None:
        self.work_root.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(
            self,
            str(self.work_root),
            recursive=True,
            event_filter=[
                FileCreatedEvent,
                FileDeletedEvent,
                FileMovedEvent,
                FileClosedEvent,
                DirCreatedEvent,
            ],
        )
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    def register(self, work_dir: Path, wake: threading.Event) -> None:
        with self._lock:
            self._wakers.setdefault(str(work_dir), set()).add(wake)

    def unregister(self, work_dir: Path, wake: threading.Event) -> None:
        with self._lock:
            wakers = self._wakers.get(str(work_dir))
            if wakers is not None:
                wakers.discard(wake)
                if not wakers:
                    del self._wakers[str(work_dir)]

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = event.src_path if isinstance(event.src_path, str) else event.src_path.decode()
        root = str(self.work_root)
        with self._lock:
            while len(path) > len(root):
                wakers = self._wakers.get(path)
                if wakers:
                    for wake in wakers:
                        wake.set()
                    return
                path = path.rsplit("/", 1)[0]


Outcome = Callable[[], str | None]


def call_callback(service: Service, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one plugin callback; record (never raise) what it raises."""
    try:
        return fn(*args)
    except Exception as e:
        text = f"{name} raised {type(e).__name__}: {e}"
        log.warning("service %s: %s", service.service_id, text, exc_info=True)
        service.record_callback_error(text, traceback.format_exc())
        return None


def watch(
    handler: WatcherHandler,
    service: Service,
    process: Process,
    *,
    wake: threading.Event,
    check: Outcome,
) -> tuple[str | None, list[str]]:
    """Follow ``process`` until it exits; return (what stopped it early, final files).

    ``check`` is called after every wait; when it returns a reason (``"timed_out"``,
    ``"cancelled"``) the caller's decision to stop the program is reported back.
    """
    interval = float(service.template.watch_interval)
    call_callback(service, "before_watch_callback", handler.before_watch_callback, service)
    watching = True
    reason: str | None = None
    last_call = 0.0
    while not process.exited.is_set():
        if watching and not service.stop_requested.is_set():
            files = list_files(service.work_dir)
            last_call = time.monotonic()
            result = call_callback(
                service, "file_change_callback", handler.file_change_callback, service, files
            )
            if result is STOP:
                watching = False
        else:
            watching = False
        next_call = last_call + interval
        while not process.exited.is_set():
            now = time.monotonic()
            if watching and now >= next_call:
                break
            wake.wait(min(next_call - now, 0.5) if watching else 0.5)
            if wake.is_set():
                wake.clear()
                if watching and not process.exited.is_set():
                    gap = last_call + MIN_CALLBACK_GAP - time.monotonic()
                    if gap > 0:
                        time.sleep(gap)
                    break
            if reason is None:
                reason = check()
            if reason is not None:
                break
        if reason is None:
            reason = check()
        if reason is not None:
            break
    files = list_files(service.work_dir)
    return reason, files
