"""The callback loop of one service: calls its handler's callbacks while its program runs.

(The handler is a ``WatcherHandler``, the plugin API's name; this loop watches files,
not processes: the program's exit comes from the reaper.) ``callback_loop`` runs in the
service's own thread: ``before_watch_callback`` once, then
``file_change_callback`` every ``watch_interval`` seconds and promptly when an entry is
created, removed or renamed in any directory of the work dir, until the program exits,
and once more after it exited, with the final file list (unless watching was stopped).
A callback that raises is recorded on the service and the loop carries on; one that
hangs is the limit enforcer's business (soaf.core.enforcer): stopping the program and
recording its exit never wait for callbacks. ``after_watch_callback`` is the
attempt's (soaf.run.attempt).

Changes are noticed by comparing the modification times of the work dir's
directories, a few ``stat`` calls per check. Unlike inotify this also works on
network file systems, costs nothing for programs that finish quickly, and cannot be
flooded by a program that writes a lot. The check runs every ``file_poll`` seconds
after a change and less often (up to ``MAX_FILE_POLL``) while the dir stays quiet, so
a thousand idle services do not keep the core busy.

Calls that cannot do anything are not made: a handler that keeps the base class's
``before_watch_callback`` or ``file_change_callback`` (which do nothing) gets no such
call, and the default handler, whose
callback only counts the files, is called when its work dir's entries may have changed
(a directory's modification time moved, or is too recent to tell: see
``DirSignature.settled``), and at least every ``COUNT_REFRESH`` seconds. One thread
(``_QuietDirs``) checks the work dirs of all such services, so a sleeping one costs a
few ``stat`` calls a second, and no wake-up of its own thread, no listing of its work
dir, no plugin call and no journal write. (A ``watch_interval`` below ``MAX_FILE_POLL``
gets the loop of any other handler.)
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from soaf.data.workdir import list_files, scan
from soaf.plugin.handler import STOP, DefaultHandler, WatcherHandler
from soaf.plugin.service import Service
from soaf.process.latch import Latch
from soaf.process.spawn import Process

log = logging.getLogger(__name__)

#: Shortest gap between two file_change_callback calls triggered by file changes.
MIN_CALLBACK_GAP = 0.05
#: Longest gap between two checks of a quiet work dir (the check interval grows from
#: ``file_poll`` to this while nothing changes, and drops back at the first change).
MAX_FILE_POLL = 1.0
#: Longest sleep of a watcher between two looks at its program (a safety net: an exit
#: wakes it at once).
MAX_WAIT = 1.0
#: Seconds the default handler's loop waits for the program's end before its first look.
FIRST_LOOK_GRACE = 0.05
#: Longest sleep of a service's thread while the shared watcher (``_QuietDirs``) or the
#: program's exit wakes it (a safety net).
IDLE_WAIT = 30.0
#: Longest gap between two calls of the default handler (which counts the files), in
#: case two changes of its work dir fell within one tick of the file system's clock.
COUNT_REFRESH = 30.0
#: Nanoseconds a directory's modification time must lie behind the moment it was read
#: for a later change to be sure to move it (timestamps come from a coarse clock).
SETTLE_NS = 100_000_000


def call_callback(service: Service, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one plugin callback; record (never raise) what it raises.

    Returns what the callback returned, or ``FAILED`` if it raised."""
    try:
        return fn(*args)
    except BaseException as e:  # SystemExit from a plugin must not end its thread silently
        text = f"{name} raised {type(e).__name__}: {e}"
        # The first error of a service is logged with its traceback; a callback that
        # fails every interval does not flood the log (every one is on the record).
        if service.callback_errors == 0:
            log.warning("service %s: %s", service.service_id, text, exc_info=True)
        else:
            log.debug("service %s: %s (again)", service.service_id, text)
        service.record_callback_error(text, traceback.format_exc())
        return FAILED


#: What ``call_callback`` returns when the callback raised.
FAILED = object()


class DirSignature:
    """Modification times of a work dir's directories, to notice added/removed entries."""

    def __init__(self, work_dir: str) -> None:
        self.work_dir = work_dir
        self.dirs: list[str] = [work_dir]
        self.read_at = 0
        self.last = self._read()

    def _read(self) -> tuple[int, ...]:
        self.read_at = time.time_ns()
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

    def watch_all(self) -> list[str]:
        """Watch every directory of the work dir, empty ones too (so that no entry can
        appear anywhere without moving a modification time watched here); returns its
        files, listed in the same walk, each directory after its time was read."""
        self.read_at = time.time_ns()
        dirs, mtimes, files = scan(self.work_dir)
        self.dirs, self.last = dirs, tuple(mtimes)
        return files

    def changed(self) -> bool:
        now = self._read()
        if now != self.last:
            self.last = now
            return True
        return False

    @property
    def settled(self) -> bool:
        """True when any change after the last read must move a watched modification
        time: each was older than ``SETTLE_NS`` when read (a change within one tick of
        the file system's clock may leave it as it was)."""
        return all(m < self.read_at - SETTLE_NS for m in self.last)


def _calls(handler: WatcherHandler) -> str:
    """Which ``file_change_callback`` calls can matter: "none" (the base class's, which
    does nothing), "count" (the default handler's: only when the files may have changed)
    or "all"."""
    fn = type(handler).file_change_callback
    if fn is WatcherHandler.file_change_callback:
        return "none"
    if fn is DefaultHandler.file_change_callback:
        return "count"
    return "all"


def callback_loop(
    handler: WatcherHandler,
    service: Service,
    process: Process,
    call: Callable[..., Any],
    *,
    wake: threading.Event,
    file_poll: float,
) -> list[str] | None:
    """Follow ``process`` with the handler's callbacks until it exits. Returns the files
    of the last look, after the end, when soaf's own ``file_change_callback`` made it
    (nothing can have changed them since: after_watch_callback may have them); else None.

    Callbacks are made through ``call(name, fn, *args)`` (soaf.run.attempt), which lets the
    limit enforcer see what is under way. ``wake`` is set when the program exits.
    """
    if type(handler).before_watch_callback is not WatcherHandler.before_watch_callback:
        call("before_watch_callback", call_callback, service, "before_watch_callback",
             handler.before_watch_callback, service)
    calls = _calls(handler)
    if calls == "none":
        while not process.exited.wait(IDLE_WAIT):
            pass
        return None
    if calls == "count" and float(service.template.watch_interval) >= MAX_FILE_POLL:
        return _count_loop(handler, service, process, call, wake=wake)
    interval = float(service.template.watch_interval)
    signature = DirSignature(str(service.work_dir)) if file_poll > 0 else None
    poll = file_poll
    next_call = time.monotonic()  # the first file check right after before_watch_callback
    last_call = float("-inf")
    changed = False
    while not process.exited.is_set():
        now = time.monotonic()
        if service.stop_requested.is_set():
            wake.wait(MAX_WAIT)
            wake.clear()
            continue
        if now >= next_call or (changed and now >= last_call + MIN_CALLBACK_GAP):
            files = list_files(service.work_dir)
            if signature is not None:
                signature.update_dirs(files)
            last_call, next_call, changed = now, now + interval, False
            result = call("file_change_callback", call_callback, service,
                          "file_change_callback", handler.file_change_callback, service, files)
            if result is STOP:
                service.stop()
            continue
        timeout = min(MAX_WAIT, next_call - now)
        if signature is not None:
            if changed:
                timeout = min(timeout, max(0.0, last_call + MIN_CALLBACK_GAP - now))
            else:
                timeout = min(timeout, poll)
        if wake.wait(max(timeout, 0.0)):
            wake.clear()
            continue
        if signature is not None and not changed:
            if signature.changed():
                changed, poll = True, file_poll
            else:
                poll = min(poll * 1.5, max(file_poll, MAX_FILE_POLL))
    if not service.stop_requested.is_set():
        # One last look once the program has ended: files it wrote just before its end
        # would otherwise reach only after_watch_callback (progress left short of 100%).
        call("file_change_callback", call_callback, service, "file_change_callback",
             handler.file_change_callback, service, list_files(service.work_dir))
    return None


def _count_loop(handler: WatcherHandler, service: Service, process: Process,
                call: Callable[..., Any], *, wake: threading.Event) -> list[str] | None:
    """``callback_loop`` for the default handler: its callback sets ``file_count``, so a
    call with the same files would change nothing. A program that ends within
    ``FIRST_LOOK_GRACE`` gets only the look after its end (most end in milliseconds:
    a first look would list the dir twice for one count). After the grace, the shared
    ``_QuietDirs`` thread checks the work dir every ``MAX_FILE_POLL`` and wakes this thread
    when it may have changed (or the program exited); only then is it listed and the
    callback called."""
    if not process.exited.wait(FIRST_LOOK_GRACE):
        entry = _Quiet(DirSignature(str(service.work_dir)), wake, process.exited)
        _quiet_dirs.add(entry)
        try:
            while not process.exited.is_set():
                if entry.due and not service.stop_requested.is_set():
                    with entry.lock:
                        files = entry.signature.watch_all()  # (times before listing: none lost)
                        entry.refresh = time.monotonic() + COUNT_REFRESH
                        entry.due = False
                    call("file_change_callback", call_callback, service, "file_change_callback",
                         handler.file_change_callback, service, files)
                    continue
                if wake.wait(IDLE_WAIT):
                    wake.clear()
        finally:
            _quiet_dirs.remove(entry)
    if service.stop_requested.is_set():
        return None
    files = list_files(service.work_dir)  # once more after the end, as callback_loop
    call("file_change_callback", call_callback, service, "file_change_callback",
         handler.file_change_callback, service, files)
    return files


def counted(handler: WatcherHandler, last_look: list[str] | None) -> bool:
    """The default handler's ``after_watch_callback`` would set the count of the files
    that its look after the program's end (``last_look``) counted already: a call that
    cannot change anything, not made."""
    cls = type(handler)
    return (last_look is not None
            and cls.after_watch_callback is DefaultHandler.after_watch_callback
            and cls.file_change_callback is DefaultHandler.file_change_callback)


class _Quiet:
    """A default-handler service as the shared watcher sees it."""

    def __init__(self, signature: DirSignature, wake: threading.Event,
                 exited: Latch) -> None:
        self.signature = signature
        self.wake = wake
        self.exited = exited
        self.lock = threading.Lock()  # the signature is read by both threads
        self.due = True  # the first look lists the work dir
        self.refresh = 0.0

    def check(self, now: float) -> None:
        """Wake the service's thread if its files may have changed, or its program has
        exited (a safety net: the exit wakes it at once)."""
        with self.lock:
            if not self.due and not self.exited.is_set():
                signature = self.signature
                if not (now >= self.refresh or signature.changed() or not signature.settled):
                    return
                self.due = True
        self.wake.set()


class _QuietDirs:
    """One thread that looks at the work dirs of every default-handler service, so a
    thousand sleeping services cost a few ``stat`` calls a second each, and no thread
    switch of their own. It runs while there is something to watch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: set[_Quiet] = set()
        self._thread: threading.Thread | None = None

    def add(self, entry: _Quiet) -> None:
        with self._lock:
            self._entries.add(entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="soaf-quiet-dirs",
                                                daemon=True)
                self._thread.start()

    def remove(self, entry: _Quiet) -> None:
        with self._lock:
            self._entries.discard(entry)

    def _loop(self) -> None:
        while True:
            time.sleep(MAX_FILE_POLL)
            with self._lock:
                if not self._entries:
                    self._thread = None
                    return
                entries = list(self._entries)
            now = time.monotonic()
            for entry in entries:
                try:
                    entry.check(now)
                except Exception:
                    log.exception("checking a work dir failed")


_quiet_dirs = _QuietDirs()
