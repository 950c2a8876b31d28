"""Stopping a program's process group: SIGTERM, a grace period, then SIGKILL.

The one stop path for every program soaf stops: one it spawned (soaf.process.spawn), one a
restarted core adopted (soaf.process.adopted), and a leftover of a dead core
(``stop_group`` in soaf.process.identity). ``GroupStop`` never blocks: ``begin`` sends
SIGTERM and schedules the SIGKILL, ``tick`` (called by the core's limit enforcer, or a
waiting loop) sends it once it is due. Signals go through the caller's ``signal_group``,
which signals only a group it has verified as its own.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from soaf.process.latch import Latch

log = logging.getLogger(__name__)


class Signallable(Protocol):
    """A program that signals its own group (soaf.process.spawn, soaf.process.adopted)."""

    @property
    def pid(self) -> int | None: ...

    def signal_group(self, sig: int) -> bool: ...


class GroupStop:
    """The stop of one process group, from the first SIGTERM to the SIGKILL."""

    @classmethod
    def of(cls, program: Signallable, label: str = "pid") -> GroupStop:
        """The stop of ``program``'s group, which holds it without keeping it alive: a
        program keeps its stop, and a stop that held its program back would make each one
        a reference cycle, freed only by the garbage collector's slow full passes."""
        ref = weakref.ref(program)

        def signal_group(sig: int) -> bool:
            alive = ref()
            return alive is not None and alive.signal_group(sig)

        def describe() -> str:
            alive = ref()
            return f"{label} {alive.pid if alive is not None else '?'}"

        return cls(signal_group, describe=describe)

    def __init__(self, signal_group: Callable[[int], bool], *,
                 describe: Callable[[], str] = lambda: "program",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._signal_group = signal_group
        self._describe = describe
        self._clock = clock
        self._kill_at: float | None = None
        self._termed_at: float | None = None  # when SIGTERM was sent
        self._grace = 0.0  # the grace period of the first stop
        #: The last signal sent to stop the group (SIGTERM, or SIGKILL after the grace).
        self.stopped_with: str | None = None

    @property
    def stopping(self) -> bool:
        return self._kill_at is not None

    def begin(self, grace: float) -> None:
        """SIGTERM now and SIGKILL once ``grace`` seconds have passed; SIGKILL at once when
        ``grace`` is 0, or when a stop is under way and this one is more urgent."""
        kill_at = self._clock() + max(grace, 0.0)
        if self._kill_at is None:
            self._kill_at, self._grace = kill_at, max(grace, 0.0)
            if grace > 0 and self._send("SIGTERM"):
                self._termed_at = self._clock()
        elif kill_at < self._kill_at:
            self._kill_at = kill_at
        self.tick()

    def tick(self) -> None:
        """Send the SIGKILL that has become due (once)."""
        now = self._clock()
        if self._kill_at is not None and now >= self._kill_at:
            due, self._kill_at = self._kill_at, float("inf")  # sent once
            termed = self.stopped_with == "SIGTERM" and self._termed_at is not None
            if self._send("SIGKILL") and termed:
                assert self._termed_at is not None
                waited = now - self._termed_at
                if due - self._termed_at < self._grace - 1e-3:  # a more urgent stop came
                    log.info("%s: stop made urgent %.3f s after SIGTERM; sent SIGKILL",
                             self._describe(), waited)
                else:
                    log.info("%s still running %.1f s after SIGTERM; sent SIGKILL",
                             self._describe(), waited)

    def _send(self, name: str) -> bool:
        # Noted before it is sent: the exit it causes may be recorded at once.
        before, self.stopped_with = self.stopped_with, name
        if self._signal_group(signal.Signals[name]):
            return True
        self.stopped_with = before
        return False


def killpg(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False if it is gone (or not ours to signal)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class GroupStopping:
    """The stop a program offers the core's limit enforcer, spawned or adopted alike:
    ``begin_stop`` never blocks, ``tick`` sends a SIGKILL that has become due."""

    exited: Latch
    _stop: GroupStop

    def begin_stop(self, grace: float) -> None:
        """SIGTERM now, SIGKILL once ``grace`` seconds have passed (see ``tick``)."""
        if not self.exited.is_set():
            self._stop.begin(grace)

    def tick(self) -> None:
        """Send the SIGKILL a stop has become due for."""
        self._stop.tick()

    @property
    def stopped_with(self) -> str | None:
        """The last signal soaf sent to stop the program (SIGTERM, or SIGKILL after the grace)."""
        return self._stop.stopped_with

    @property
    def stopping(self) -> bool:
        return self._stop.stopping
