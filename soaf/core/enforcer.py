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
#: A service with nothing due at a pass's precision (see ``relaxed``) is ticked on every
#: this many passes only (0.8 s: under soaf.process.census.OBSERVE_INTERVAL, so its
#: lineage misses no look at the core's descendants), spread over the passes.
RELAXED_EVERY = 4
#: Seconds between two passes over the services whose program has a memory limit
#: (``Supervised.fast``), so a fast allocator is caught early; the others cost nothing more.
FAST_INTERVAL = 0.05


def relaxed(run: Supervised) -> bool:
    """True for a service whose program has no timeout, is settled (its pid known: a
    shimmed program's is found at a tick; its first samples taken), and that no
    cancel or stop has reached: nothing of it is due within a pass's precision (its
    memory samples are 0.5 s apart or more, a takeover of a stuck callback waits
    seconds, and a stop, which starts the SIGKILL's grace period, pokes a full pass
    and makes it not relaxed)."""
    policy, halt = getattr(run, "policy", None), getattr(run, "halt", None)
    return (policy is not None and halt is not None and policy.timeout is None
            and not halt.halted and getattr(run, "settled", True))


class LimitEnforcer:
    """Calls ``tick(now)`` on every registered service every ``interval`` seconds (the
    ``relaxed`` ones every ``RELAXED_EVERY`` intervals), on the ``fast`` ones every
    ``fast_interval``, and on all at once after ``poke()`` (a cancel, a core stop).

    Thousands of sleeping services would otherwise cost the core a call each, five times a
    second, for nothing."""

    def __init__(self, *, interval: float = DEFAULT_INTERVAL,
                 fast_interval: float = FAST_INTERVAL) -> None:
        self.interval = interval
        self.fast_interval = fast_interval
        self._runs: dict[str, Supervised] = {}
        self._fast: dict[str, Supervised] = {}
        self._lock = threading.Lock()
        self._poked = threading.Event()
        self._stopping = False
        self._passes = 0
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
            if getattr(run, "fast", False):
                self._fast[run.service_id] = run

    def remove(self, run: Supervised) -> None:
        with self._lock:
            if self._runs.get(run.service_id) is run:
                del self._runs[run.service_id]
            if self._fast.get(run.service_id) is run:
                del self._fast[run.service_id]

    def poke(self) -> None:
        """Look at every service now, not at the next interval."""
        self._poked.set()

    def _loop(self) -> None:
        next_pass = time.monotonic() + self.interval
        while not self._stopping:
            wait = next_pass - time.monotonic()
            if self._fast:
                wait = min(wait, self.fast_interval)
            poked = self._poked.wait(max(wait, 0.0))
            if poked:  # (a poke that comes after a wait ran out is kept for the next one)
                self._poked.clear()
            if poked or time.monotonic() >= next_pass:
                next_pass = time.monotonic() + self.interval
                self._passes += 1
                self.tick(spread=not poked)
            else:
                self.tick(fast_only=True)

    def tick(self, *, fast_only: bool = False, spread: bool = False) -> None:
        """One pass over every service (the fast ones only: ``fast_only``; with ``spread``,
        a relaxed one only on its turn, one pass in ``RELAXED_EVERY``)."""
        with self._lock:
            runs = list((self._fast if fast_only else self._runs).values())
        now = time.monotonic()
        turn = self._passes % RELAXED_EVERY
        for run in runs:
            try:
                if spread and hash(run.service_id) % RELAXED_EVERY != turn and relaxed(run):
                    continue
                run.tick(now)
            except Exception:
                log.exception("supervising %s failed", run.service_id)
