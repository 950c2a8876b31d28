"""The reloader: notices plugin edits and loads a new plugin generation, in its own thread.

Two ways to notice an edit, because file-system notifications are not reliable
everywhere (network and container file systems drop them):

* a watchdog observer on ``<plugins>/handlers`` and ``<plugins>/services`` (and on the
  plugin root, to see those packages appear); any created, changed, moved or deleted
  ``.py`` file counts, ``__pycache__`` and hidden editor files do not;
* a poll every ``poll`` seconds that hashes the plugin sources (``content_digest``).

Either one only marks the plugins as possibly changed. The reloader then waits until
the files have been quiet for ``debounce`` seconds (an editor's save, or a ``git
checkout``, is a burst of events) and reloads only if the content digest differs
from the last load attempt, so a touched file or a re-saved identical file is not a
new version and a broken version is not retried until it changes. ``request()``
(the ``reload`` control message) always reloads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from soaf.errors import PluginError
from soaf.plugin.loader import PACKAGES, PluginLoader, content_digest, is_source

log = logging.getLogger(__name__)

#: Longest time a reload waits for a continuous stream of changes to go quiet.
MAX_SETTLE = 5.0

_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent,
           FileDeletedEvent, DirCreatedEvent, DirDeletedEvent, DirMovedEvent]


class _Events(FileSystemEventHandler):
    """Forwards the events that concern plugin sources to the reloader."""

    def __init__(self, reloader: Reloader) -> None:
        self.reloader = reloader

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = [event.src_path, getattr(event, "dest_path", "")]
        for raw in paths:
            path = raw.decode() if isinstance(raw, bytes) else raw
            if path and self.reloader.concerns(Path(path), is_dir=event.is_directory):
                self.reloader.changed()
                return


class Reloader:
    """Watches the plugin sources and reloads ``loader`` when they change.

    ``on_result(ok)`` is called in the reloader's thread after every load attempt (the
    core publishes the outcome to Redis there).
    """

    def __init__(
        self,
        loader: PluginLoader,
        *,
        debounce: float,
        poll: float,
        watch: bool,
        timeout: float | None,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self.loader = loader
        self.root = loader.root
        self.debounce = debounce
        self.poll = poll
        self.watch = watch
        self.timeout = timeout
        self.on_result = on_result
        self._cond = threading.Condition()
        self._changes = 0
        self._forced = 0
        self._stopping = False
        self._observer: Any = None
        self._watches: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._loop, name="soaf-reloader", daemon=True)

    # -- control ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.watch:
            self._observer = Observer()
            self._observer.daemon = True
            self._observer.schedule(_Events(self), str(self.root), recursive=False,
                                    event_filter=[DirCreatedEvent, DirMovedEvent])
            for package in PACKAGES:
                self._watch_package(package)
            self._observer.start()
        self._thread.start()
        log.info("reloading plugins on change (file events %s, poll every %s, debounce %g s)",
                 "on" if self.watch else "off",
                 f"{self.poll:g} s" if self.poll > 0 else "never", self.debounce)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=timeout)
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def request(self) -> None:
        """Reload now (without waiting for the result), even if nothing changed."""
        with self._cond:
            self._forced += 1
            self._cond.notify_all()

    def changed(self) -> None:
        """Note that the plugin sources may have changed (called by the observer)."""
        with self._cond:
            self._changes += 1
            self._cond.notify_all()

    def concerns(self, path: Path, *, is_dir: bool) -> bool:
        """Whether an event on ``path`` may change the plugins."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        if len(rel.parts) == 1 and rel.parts[0] in PACKAGES and is_dir:
            self._watch_package(rel.parts[0])  # a package dir (re)appeared: watch inside it
            return True
        return is_source(rel) and (is_dir or rel.suffix == ".py")

    def _watch_package(self, package: str) -> None:
        base = self.root / package
        if self._observer is None or not base.is_dir():
            return
        old = self._watches.pop(package, None)
        if old is not None:
            try:
                self._observer.unschedule(old)
            except (KeyError, ValueError, OSError):
                pass
        try:
            self._watches[package] = self._observer.schedule(
                _Events(self), str(base), recursive=True, event_filter=_EVENTS)
        except OSError as e:
            log.warning("cannot watch %s (%s); relying on the poll", base, e)

    # -- the thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        next_poll = time.monotonic() + self.poll
        seen_changes = 0
        while True:
            with self._cond:
                while not (self._stopping or self._forced or self._changes != seen_changes):
                    if self.poll > 0:
                        left = next_poll - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    else:
                        self._cond.wait()
                if self._stopping:
                    return
                forced, self._forced = self._forced, 0
                noticed = self._changes != seen_changes
                seen_changes = self._changes
            try:
                if forced:
                    self._reload()
                    continue
                if not noticed:  # the poll is due
                    next_poll = time.monotonic() + self.poll
                    noticed = content_digest(self.root) != self.loader.attempted_digest
                if noticed:
                    seen_changes = self._settle(seen_changes)
                    if seen_changes < 0:
                        return
                    with self._cond:
                        if self._forced:
                            continue  # the forced reload, next round, covers this change
                    if content_digest(self.root) != self.loader.attempted_digest:
                        self._reload()
            except Exception:  # never let the reloader die: it is the only one
                log.exception("plugin reloader error; carrying on")
                time.sleep(min(1.0, self.poll or 1.0))

    def _woken(self, seen: int) -> bool:
        """Whether a waiter on ``_cond`` must look again (call it holding ``_cond``)."""
        return self._stopping or self._forced > 0 or self._changes != seen

    def _settle(self, seen: int) -> int:
        """Wait until no event came and the sources did not change for ``debounce`` s.

        Returns the event count seen last, or -1 when stopping.
        """
        limit = time.monotonic() + MAX_SETTLE
        digest = content_digest(self.root)
        while True:
            with self._cond:
                self._cond.wait_for(partial(self._woken, seen), timeout=self.debounce)
                if self._stopping:
                    return -1
                if self._forced:
                    return seen  # a forced reload goes ahead now
                moved = self._changes != seen
                seen = self._changes
            if time.monotonic() >= limit:
                log.warning("plugin files kept changing for %g s; reloading anyway", MAX_SETTLE)
                return seen
            if moved:
                continue
            now = content_digest(self.root)
            if now == digest:
                return seen
            digest = now

    def _reload(self) -> bool:
        try:
            self.loader.load(timeout=self.timeout)
        except PluginError:
            ok = False
        else:
            ok = True
        if self.on_result is not None:
            try:
                self.on_result(ok)
            except Exception:
                log.exception("reporting the plugin load failed")
        return ok

    def reload(self) -> bool:
        """Reload now in the caller's thread, even if nothing changed; True if it worked."""
        return self._reload()
