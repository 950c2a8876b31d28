"""LimitEnforcer: one thread of the core that enforces every running service's limits.

Each service's own thread runs its plugin code inline (build, prepare_input_file, the
handler's callbacks), which costs nothing extra, but a plugin may never return. So
the duties that must not wait for plugin code live here, for all services at once:

* stop a program whose timeout passed, whose service was cancelled, that uses more
  memory than its limit, or whose core is stopping (SIGTERM, SIGKILL after the grace
  period: the process group, never blocking);
* take a service over from a thread stuck in plugin code once that code has had its
  time (a callback still running after the program ended, a build still running after
  a cancel, an ``after_watch_callback`` past its budget): a new thread finishes the
  attempt, and the stuck one is dropped when, if ever, its call returns.

A program's exit is recorded by the reaper's exit callback, not by any of these
threads. Each service decides what is due in ``ServiceRun.tick`` (soaf.run.limits).
"""

from __future__ import annotations

import logging
import threading
import time

from soaf.run.ports import Supervised

log = logging.getLogger(__name__)

#: Seconds between two passes over every service (timeouts act within this).
DEFAULT_INTERVAL = 0.2


class LimitEnforcer:
    """Calls ``tick(now)`` on every registered service every ``interval`` seconds, and
    at once after ``poke()`` (a cancel, a core stop)."""

    def __init__(self, *, interval: float = DEFAULT_INTERVAL) -> None:
        self.interval = interval
        self._runs: dict[str, Supervised] = {}
        self._lock = threading.Lock()
        self._poked = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="soaf-enforcer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._poked.set()
        self._thread.join(timeout=5)

    def add(self, run: Supervised) -> None:
        with self._lock:
            self._runs[run.service_id] = run

    def remove(self, run: Supervised) -> None:
        with self._lock:
            if self._runs.get(run.service_id) is run:
                del self._runs[run.service_id]

    def poke(self) -> None:
        """Look at every service now, not at the next interval."""
        self._poked.set()

    def _loop(self) -> None:
        while not self._stopping:
            self._poked.wait(self.interval)
            self._poked.clear()
            self.tick()

    def tick(self) -> None:
        """One pass over every service."""
        with self._lock:
            runs = list(self._runs.values())
        now = time.monotonic()
        for run in runs:
            try:
                run.tick(now)
            except Exception:
                log.exception("supervising %s failed", run.service_id)
