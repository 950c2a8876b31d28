"""The limits of one attempt: when its program must stop, and how long a plugin call may take.

The core's limit enforcer (soaf.core.enforcer) ticks every running service; each tick
asks ``Limits.reason`` whether the program must stop now (the core stopping, a cancel,
the timeout, the memory limit) and ``Limits.call_deadline`` whether the plugin call under
way has overstayed, so the run is handed to a new thread. Nothing here waits for plugin
code, and nothing here knows Redis.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

from soaf.config import Settings
from soaf.process import cgroup
from soaf.protocol.state import State
from soaf.run.control import Halt
from soaf.run.outcome import INTERRUPTED
from soaf.run.policy import Policy

log = logging.getLogger(__name__)

#: Seconds between two looks at the resident memory of a program that has a limit (the
#: enforcer ticks such services this often). A program that allocates R MiB/s overshoots
#: its limit by at most about R times this (plus the time the kernel takes to kill it).
MEMORY_CHECK_INTERVAL = 0.05
#: Seconds between two samples of the memory and CPU time of a program without a limit;
#: its record's ``max_rss_kb`` is the peak of these samples (and of its rusage).
SAMPLE_INTERVAL = 0.5
#: A program without a limit that has run a while is sampled every this share of its age
#: (a sample reads several /proc files: thousands of long sleepers would keep the core
#: busy), between SAMPLE_INTERVAL and MAX_SAMPLE_INTERVAL seconds.
SAMPLE_AGE_SHARE = 0.1
MAX_SAMPLE_INTERVAL = 5.0
#: Seconds after its start when a program without a limit is first sampled, so that one
#: running 0.5 s has a sample, with the enforcer's tick (0.2 s) added.
FIRST_SAMPLE = 0.3
#: Seconds after its start during which a program is ticked at every enforcer pass (not
#: one pass in four): its first samples keep their pace, so a short program's peak
#: memory is seen.
YOUNG = 2.0
#: Plugin calls made before the program starts.
PREPARE_STEPS = ("handler", "program", "build", "prepare_input_file", "command",
                 "environment", "working_dir")
WATCH_CALLBACKS = ("before_watch_callback", "file_change_callback")
AFTER = "after_watch_callback"
#: The last plugin call of a successful attempt (it may upload: no callback budget).
COLLECT = "collect_output_files"


class Stoppable(Protocol):
    """A running program as the limits see it (spawned or adopted)."""

    def rss_kb(self) -> int: ...

    def begin_stop(self, grace: float) -> None: ...


class Limits:
    """Timeout, memory limit and stop requests of one attempt's program, and the time
    budget of its plugin calls."""

    def __init__(self, policy: Policy, halt: Halt, settings: Settings) -> None:
        self.policy = policy
        self.halt = halt
        self.kill_grace = settings.kill_grace
        self.callback_timeout = settings.callback_timeout
        self.timeout: float | None = None  # set once the program runs
        self.memory_kb = policy.max_memory_kb
        self.rss_kb = 0  # the last resident memory seen
        self.stop_reason: str | None = None
        #: Seconds after_watch_callback may take (the handler's ``after_watch_timeout``).
        self.after_budget = settings.callback_timeout
        self._deadline: float | None = None
        self._next_sample = float("inf")
        self._started = 0.0
        #: The program's own cgroup (soaf.process.cgroup), where the kernel holds the limit.
        self.cgroup: Path | None = None

    def enter_cgroup(self, cgroups: cgroup.Cgroups | None, name: str) -> Path | None:
        """A cgroup with ``memory.max`` for the program, where cgroups are delegated and
        it has a memory limit; None: the limit is polled only."""
        if cgroups is None or self.memory_kb is None:
            return None
        try:
            self.cgroup = cgroups.create(name, memory_max_kb=self.memory_kb)
        except OSError as e:
            log.warning("cannot create cgroup %s (the memory limit is polled): %s", name, e)
        return self.cgroup

    def leave_cgroup(self) -> str | None:
        """The program has ended: remove its cgroup; "memory" if its limit killed it."""
        path, self.cgroup = self.cgroup, None
        if path is None:
            return None
        killed = cgroup.oom_killed(path)
        cgroup.remove(path)
        return "memory" if killed else None

    @property
    def fast(self) -> bool:
        """True when the program must be looked at every ``MEMORY_CHECK_INTERVAL``."""
        return self.memory_kb is not None

    def started(self, *, ran_for: float = 0.0) -> None:
        """The program runs (has run for ``ran_for`` seconds already): its timeout counts."""
        now = time.monotonic()
        self._started = now - ran_for
        self._next_sample = now if self.fast else now + FIRST_SAMPLE
        if self.policy.timeout is not None:
            self.timeout = self.policy.timeout
            self._deadline = time.monotonic() + max(0.0, self.policy.timeout - ran_for)

    def young(self, now: float) -> bool:
        """Not started yet, or started less than YOUNG seconds ago."""
        return not self._started or now - self._started < YOUNG

    def set_handler(self, handler: Any) -> None:
        own = getattr(handler, "after_watch_timeout", None)
        self.after_budget = float(own) if own else self.callback_timeout

    def reason(self, now: float, program: Stoppable) -> str | None:
        """Why the program must stop now, or None."""
        halt = self.halt
        if halt.interrupt_requested:
            return INTERRUPTED
        if halt.cancel_requested:
            return State.CANCELLED.value
        if self._deadline is not None and now >= self._deadline:
            return State.TIMED_OUT.value
        if now >= self._next_sample:
            self._next_sample = now + (MEMORY_CHECK_INTERVAL if self.fast else min(
                MAX_SAMPLE_INTERVAL, max(SAMPLE_INTERVAL, (now - self._started) * SAMPLE_AGE_SHARE)))
            self.rss_kb = program.rss_kb()
            if self.memory_kb is not None and self.rss_kb > self.memory_kb:
                return "memory"
        return None

    def enforce(self, now: float, program: Stoppable, service_id: str) -> bool:
        """Begin stopping ``program`` if it must stop now; False after a forced stop
        (nothing more to do for it this tick)."""
        if self.halt.force:
            self.stop_reason = self.stop_reason or INTERRUPTED
            program.begin_stop(0)
            return False
        if self.stop_reason is None:
            reason = self.reason(now, program)
            if reason is not None:
                self.stop_reason = reason
                log.info("stopping service %s (%s)", service_id, reason)
                program.begin_stop(self.grace_for(reason))
        return True

    def grace_for(self, reason: str) -> float:
        """Seconds between SIGTERM and SIGKILL for a stop for ``reason``."""
        return 0.0 if reason == "memory" else self.kill_grace

    def watch_grace(self) -> float:
        """How long a callback may go on after the program ended."""
        if self.stop_reason in (State.CANCELLED.value, INTERRUPTED):
            return self.kill_grace
        return self.after_budget

    def call_deadline(self, name: str, started: float, exited_at: float | None) -> float | None:
        """When a plugin call ``name`` running since ``started`` has overstayed
        (monotonic), given when the program exited (None: it runs, or never ran)."""
        halt = self.halt
        if halt.force:
            return started
        if name in PREPARE_STEPS or name == COLLECT:
            return None if halt.at is None else halt.at + self.kill_grace
        if name in WATCH_CALLBACKS:
            if exited_at is None:
                return None  # the program runs; a slow callback only delays the next one
            return exited_at + self.watch_grace()
        return started + self.after_budget  # after_watch_callback
