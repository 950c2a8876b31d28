"""What steers a run from outside its own thread: stop requests, and which thread owns it.

``Halt`` holds the requests that stop a run (a cancel, the core stopping); they are plain
flags, set once from any thread and read anywhere, with ``wake`` telling the run's thread
at once. ``CallGuard`` records the plugin call under way in the thread that owns the run,
so the core's limit enforcer can tell a call that overstays and hand the run to a new
thread (``take_over``); the stuck thread finds out when, if ever, its call returns
(``Orphaned``) and ends without touching the service again.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Orphaned(BaseException):
    """This thread's plugin call returned after the run was handed to another thread: the
    thread must end without touching the service again."""


class Halt:
    """The stop requests of one run."""

    def __init__(self, on_halt: Callable[[], None] | None = None) -> None:
        self.cancel_requested = False
        self.interrupt_requested = False
        self.force = False  # stop now: no grace period, no after_watch_callback
        self.at: float | None = None  # monotonic time of the first cancel/interrupt
        self.wake = threading.Event()
        self._on_halt = on_halt

    @property
    def halted(self) -> bool:
        """A cancel or an interrupt came: the program must not start (or must stop)."""
        return self.at is not None

    def cancel(self) -> None:
        self.cancel_requested = True
        self._halt()

    def interrupt(self, *, force: bool = False) -> None:
        if force:
            self.force = True
        self.interrupt_requested = True
        self._halt()

    def _halt(self) -> None:
        if self.at is None:
            self.at = time.monotonic()
        self.wake.set()
        if self._on_halt is not None:
            self._on_halt()

    def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; True as soon as a cancel or interrupt comes instead."""
        deadline = time.monotonic() + seconds
        while not self.halted:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.wake.wait(left)
            self.wake.clear()
        return True


class CallGuard:
    """The plugin call under way in the thread that owns a run, and the generation of
    that ownership (a takeover bumps it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generation = 0
        #: (call name, monotonic start, the attempt that made it), or None between calls.
        self.in_call: tuple[str, float, Any] | None = None

    @property
    def busy(self) -> bool:
        """The owner thread is inside plugin code now. (No lock: one attribute read is
        atomic, and the answer may change the moment after either way.)"""
        return self.in_call is not None

    def call(self, name: str, owner: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """Run plugin code ``fn(*args)`` in this thread, letting the enforcer see it;
        Orphaned if the run was handed to another thread meanwhile."""
        with self._lock:
            generation = self.generation
            self.in_call = (name, time.monotonic(), owner)
        orphaned = False
        try:
            return fn(*args)
        finally:
            with self._lock:
                if self.generation != generation:
                    orphaned = True
                else:
                    self.in_call = None
            if orphaned:
                raise Orphaned(name)

    def take_over(self, now: float, deadline: Callable[[str, float, Any], float | None]
                  ) -> tuple[str, Any] | None:
        """If the call under way has passed ``deadline(name, started, owner)``, make the
        current thread's ownership stale; (call name, owner) for the new thread."""
        with self._lock:
            if self.in_call is None:
                return None
            name, started, owner = self.in_call
            due = deadline(name, started, owner)
            if due is None or now < due:
                return None
            self.generation += 1
            self.in_call = None
            return name, owner


class Once:
    """Listeners of something that happens once: those added before it are called when it
    happens (``fire``), those added after it at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Callable[..., None]] | None = []

    def add(self, listener: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._listeners is not None:
                self._listeners.append(functools.partial(listener, *args))
                return
        listener(*args)

    def fire(self) -> None:
        """It happened: call the listeners (each once; one that raises is logged)."""
        with self._lock:
            listeners, self._listeners = self._listeners, None
        for listener in listeners or ():
            try:
                listener()
            except Exception:
                log.exception("a listener failed")
