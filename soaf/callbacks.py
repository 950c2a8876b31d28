"""PluginThread: runs one service's plugin code (build, prepare, callbacks) off its supervisor.

Plugin code may raise, or never return. The service's own thread supervises the
program (exit, timeout, cancel) and only ever *waits* for plugin code, with a time
budget; plugin code runs here, one call at a time, so a handler never sees two of its
callbacks at once. A call that overruns its budget is abandoned: the stuck thread is
left to finish (or not) on its own, and the next call gets a fresh thread. Python
cannot kill a thread, so an abandoned one is logged and counted, never silently lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Threads abandoned in this process because plugin code they ran never returned.
abandoned_threads = 0
_abandoned_lock = threading.Lock()


class Call:
    """One call handed to a PluginThread; ``done`` is set when it has returned or raised."""

    def __init__(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.name = name
        self.fn = fn
        self.args = args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.traceback: str | None = None
        self.started_at: float | None = None

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # a plugin may raise SystemExit too; it must not escape
            self.error = e
            self.traceback = traceback.format_exc()
        finally:
            self.done.set()

    def wait(self, timeout: float | None = None, *, until: threading.Event | None = None,
             poll: Callable[[], bool] | None = None) -> bool:
        """Wait until the call returned (True), ``timeout`` passed or ``until``/``poll`` fired."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done.is_set():
            step = 0.25
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                step = min(step, left)
            if until is not None and until.is_set():
                return False
            if poll is not None and poll():
                return False
            self.done.wait(step)
        return True

    def unwrap(self) -> Any:
        """The call's result, or re-raise what it raised."""
        if self.error is not None:
            raise self.error
        return self.result


class PluginThread:
    """A worker thread for one service's plugin calls; replaced when a call hangs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[Call | None] | None = None
        self._current: Call | None = None
        self._generation = 0

    @property
    def busy(self) -> bool:
        """True while a call handed in has not returned yet."""
        current = self._current
        return current is not None and not current.done.is_set()

    @property
    def current(self) -> Call | None:
        return self._current

    def submit(self, name: str, fn: Callable[..., Any], *args: Any) -> Call:
        """Queue ``fn(*args)``; the returned Call tells when it is done."""
        call = Call(name, fn, args)
        if self._queue is None:
            self._start()
        assert self._queue is not None
        self._current = call
        self._queue.put(call)
        return call

    def _start(self) -> None:
        self._generation += 1
        q: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._queue = q
        thread = threading.Thread(target=self._work, args=(q,), daemon=True,
                                  name=f"{self.name}-plugin{self._generation}")
        thread.start()

    @staticmethod
    def _work(q: queue.SimpleQueue[Call | None]) -> None:
        while True:
            call = q.get()
            if call is None:
                return
            call.run()

    def abandon(self) -> None:
        """Leave the current (stuck) call to its thread; later calls get a new thread."""
        global abandoned_threads
        current, self._current = self._current, None
        if self._queue is not None:
            self._queue.put(None)  # the stuck thread ends if its call ever returns
            self._queue = None
        if current is not None and not current.done.is_set():
            with _abandoned_lock:
                abandoned_threads += 1
            log.warning("%s: %s has not returned; abandoning its thread (%d abandoned so far)",
                        self.name, current.name, abandoned_threads)

    def close(self) -> None:
        """Let the worker thread end once its queue is empty."""
        if self._queue is not None:
            self._queue.put(None)
            self._queue = None
