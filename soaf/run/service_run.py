"""ServiceRun: one service from claim to final state, in a thread of its own.

Its thread runs the plugin code inline. If that code hangs, the core's supervisor
(``tick``, from soaf.core.enforcer) takes the run over: it bumps the run's generation and
starts a new thread that finishes the attempt (``Attempt.resume``) and goes on with
the run; the stuck thread finds, if its call ever returns, that it is no longer the
owner (``Orphaned``) and ends.

A run is a series of attempts (soaf.run.attempt): the first, then, when the service opted
into retries, one more after each failed or timed-out attempt, after a backoff, while
retries are left. Each attempt is recorded in the ``attempts`` field. The final state
is written once, and it acknowledges the stream entry; once it is in Redis
(``final_written``) the attempt's journal (soaf.run.journal) is removed. A final that a
newer attempt elsewhere fenced out acknowledges nothing (soaf.core.writer). Whatever a
plugin raises ends an attempt as ``failed`` with the error and traceback; it never
reaches the core.

When the core stops without draining (``interrupt()``), the program is stopped but no
final state is written: the record goes back to ``queued`` and the stream entry stays
unacknowledged, so the service is run again when a core recovers it.

Data (docs/data.md): each attempt writes the run's marker (soaf/data/markers.py) when it
takes its work dir; the run rewrites it with the final state and outputs when it ends.
``soaf://`` inputs are resolved through ``lookup`` (another service's record).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaf.config import Settings
from soaf.core.enforcer import Supervisor
from soaf.core.logkeeper import LogKeeper
from soaf.core.writer import StateWriter
from soaf.data import markers
from soaf.data.handoff import Lookup, resolve_ref
from soaf.errors import FetchError
from soaf.plugin.loader import Registry
from soaf.process.spawn import Reaper
from soaf.protocol.state import Change, State
from soaf.protocol.template import ServiceParamTemplate
from soaf.run.attempt import Attempt, Orphaned
from soaf.run.journal import RunJournal
from soaf.run.outcome import INTERRUPTED, Outcome

log = logging.getLogger(__name__)

#: Fields that describe one attempt; cleared when the next attempt starts.
ATTEMPT_FIELDS = (
    "pid", "command", "exit_code", "signal", "stopped_with", "wall_time", "cpu_time",
    "max_rss_kb", "exited_at", "error", "failure", "failed_in", "traceback", "progress",
    "message", "callback_error", "callback_traceback", "callback_errors", "running_at",
    "preparing_at", "stdout_bytes", "stderr_bytes", "stdout_dropped_bytes",
    "stderr_dropped_bytes", "missing_outputs", "inputs", "outputs", "output_target",
)


@dataclass
class Claim:
    """What the intake learned when it claimed a stream entry for this core."""

    entry_id: str
    attempt: int
    seq: int
    attempts: list[dict[str, Any]] = field(default_factory=list)  # earlier attempts' records

    @staticmethod
    def parse_attempts(raw: bytes | str) -> list[dict[str, Any]]:
        """The ``attempts`` field a claim returned (JSON text); [] when absent or bad."""
        try:
            value = json.loads(raw) if raw else []
        except ValueError:
            return []
        return [a for a in value if isinstance(a, dict)] if isinstance(value, list) else []


class ServiceRun:
    """Runs one service; ``start()`` spawns its thread, ``cancel()``/``interrupt()`` anytime."""

    def __init__(
        self,
        template: ServiceParamTemplate,
        claim: Claim,
        *,
        registry: Registry,
        settings: Settings,
        writer: StateWriter,
        reaper: Reaper,
        on_done: Callable[[ServiceRun], None],
        keeper: LogKeeper | None = None,
        supervisor: Supervisor | None = None,
        lookup: Lookup | None = None,
    ) -> None:
        self.template = template
        self.claim = claim
        self.registry = registry
        self.settings = settings
        self.writer = writer
        self.reaper = reaper
        self.keeper = keeper
        self.supervisor = supervisor
        self.on_done = on_done
        self.lookup = lookup
        #: The run marker, written by each attempt as it takes its work dir.
        self.marker: markers.Marker | None = None
        self.service_id = template.service_id
        self.program_cls = registry.program(template.service)
        self.handler_cls = registry.handler(template.service)
        self.attempt = claim.attempt
        self.attempts: list[dict[str, Any]] = list(claim.attempts)
        self.current: Attempt | None = None
        # Requests (plain flags: set once, read anywhere; ``wake`` tells the run's thread).
        self.cancel_requested = False
        self.interrupt_requested = False
        self.force = False  # stop now: no grace period, no after_watch_callback
        self.halt_at: float | None = None  # monotonic time of the first cancel/interrupt
        self.wake = threading.Event()
        # Which thread owns the run: a takeover bumps the generation; ``in_call`` is the
        # plugin call under way in the owner thread: (name, monotonic start, attempt).
        self.lock = threading.Lock()
        self.generation = 0
        self.in_call: tuple[str, float, Attempt] | None = None
        self._seq = claim.seq
        self._seq_lock = threading.Lock()
        self._closed = False
        #: The journal (soaf.run.journal) of the attempt under way, from the moment its work dir
        #: exists; each attempt starts its own.
        self.journal: RunJournal | None = None
        #: Set when a newer attempt took this service over (this core was thought dead):
        #: the program is stopped, after_watch_callback is not called, writes are fenced.
        self.superseded = False
        #: Set once the final state is in Redis (or was fenced out by a newer attempt).
        self.final_written = threading.Event()
        #: Asked before after_watch_callback: False if a newer attempt exists (set by the core).
        self.still_current: Callable[[ServiceRun], bool] | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"soaf-svc-{self.service_id[:12]}", daemon=True
        )

    @property
    def work_dir(self) -> Path | None:
        """The current attempt's work dir (the sweep leaves it alone), once taken."""
        current = self.current
        return current.work_dir if current is not None else None

    def resolve(self, ref: str) -> Path | str:
        """Where a ``soaf://`` input is: a local path or the URL it was uploaded to."""
        if self.lookup is None:
            raise FetchError(ref, "this core cannot read other services' records")
        return resolve_ref(ref, lookup=self.lookup, work_root=self.settings.work_root)

    def start(self) -> None:
        if self.supervisor is not None:
            self.supervisor.add(self)
        self.thread.start()

    def cancel(self) -> None:
        """Stop the service for good: it ends ``cancelled``."""
        self.cancel_requested = True
        self._halt()

    def interrupt(self, *, force: bool = False) -> None:
        """The core is stopping: stop the program, leave the service for recovery.

        With ``force``, waits for nothing (no grace period, no after_watch_callback)."""
        if force:
            self.force = True
        self.interrupt_requested = True
        self._halt()

    @property
    def halted(self) -> bool:
        """A cancel or an interrupt came: the program must not start (or must stop)."""
        return self.halt_at is not None

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; True as soon as a cancel or interrupt comes instead."""
        deadline = time.monotonic() + seconds
        while not self.halted:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.wake.wait(left)
            self.wake.clear()
        return True

    def _halt(self) -> None:
        if self.halt_at is None:
            self.halt_at = time.monotonic()
        self.wake.set()
        if self.supervisor is not None:
            self.supervisor.poke()

    # -- supervision (the supervisor's thread) ------------------------------------------

    def tick(self, now: float) -> None:
        """Enforce the program's limits; take over from a thread stuck in plugin code."""
        attempt = self.current
        if attempt is not None:
            attempt.enforce(now)
        with self.lock:
            if self.in_call is None:
                return
            name, started, stuck = self.in_call
            deadline = stuck.deadline_for(name, started)
            if deadline is None or now < deadline:
                return
            self.generation += 1
            self.in_call = None
        log.warning("service %s: %s has not returned; a new thread finishes attempt %d",
                    self.service_id, name, stuck.number)
        threading.Thread(target=self._run, kwargs={"resume": (stuck, name)}, daemon=True,
                         name=f"soaf-svc-{self.service_id[:12]}-g{self.generation}").start()

    # -- recording ----------------------------------------------------------------------

    def emit(self, values: dict[str, Any], *, attempt: int | None = None,
             final: bool = False) -> None:
        """Queue a change of the record. Changes from an attempt that is over (a callback
        abandoned earlier that returns late) or after the final state are dropped."""
        with self._seq_lock:
            if self._closed or (attempt is not None and attempt != self.attempt):
                log.debug("dropping a late change of %s: %s", self.service_id, list(values))
                return
            self._seq += 1
            self.writer.put(Change(self.service_id, self.attempt, self._seq, values,
                                   ack=self.claim.entry_id if final else None,
                                   on_written=self._final_written if final else None))
            if final:
                self._closed = True

    @property
    def final_queued(self) -> bool:
        """The final state has been handed to the writer (it may not be in Redis yet)."""
        return self._closed

    def _final_written(self, applied: bool) -> None:
        if self.journal is not None:
            self.journal.remove()
        self.final_written.set()

    def journal_step(self, step: str, *, save: bool = False, **info: Any) -> dict[str, Any]:
        """Record ``step`` in the attempt's journal; the values to write with it."""
        if self.journal is None:
            return {}
        return self.journal.try_step(step, **info) if save else self.journal.step(step, **info)

    def new_journal(self, number: int, work_dir: Any) -> RunJournal:
        """Start attempt ``number``'s journal; the last attempt's one is done with."""
        if self.journal is not None and self.journal.data.attempt != number:
            self.journal.remove()
        self.journal = RunJournal(self.settings.work_root, self.settings.node, self.service_id,
                                  number, work_dir)
        return self.journal

    # -- the run ------------------------------------------------------------------------

    def _run(self, resume: tuple[Attempt, str] | None = None) -> None:
        final: dict[str, Any] | None
        try:
            final = self._attempts(resume)
        except Orphaned:
            log.info("service %s: a plugin call returned after its attempt was taken over",
                     self.service_id)
            return
        except Exception as e:
            log.exception("service %s: soaf failed running it", self.service_id)
            final = {"state": State.FAILED.value, "failure": "core", "error": f"core: {e}",
                     "traceback": traceback.format_exc()}
        if final is None:
            log.info("service %s interrupted; left for recovery", self.service_id)
        else:
            now = time.time()
            final.setdefault(f"{final['state']}_at", now)
            final["finished_at"] = now
            self._mark_finished(final["state"])
            if self.journal is not None:
                final.update(self.journal.finish(final))
            self.emit(final, final=True)
            log.info("service %s %s", self.service_id, final["state"])
        if self.supervisor is not None:
            self.supervisor.remove(self)
        try:
            self.on_done(self)
        except Exception:
            log.exception("on_done failed for %s", self.service_id)

    def _attempts(self, resume: tuple[Attempt, str] | None) -> dict[str, Any] | None:
        while True:
            if resume is not None:
                attempt, stuck = resume
                resume = None
                outcome = attempt.resume(stuck)
            else:
                if self.attempt > self.claim.attempt:
                    self._begin_retry()
                attempt = self.new_attempt()
                self.current = attempt
                outcome = attempt.run()
            if outcome.state == INTERRUPTED:
                self._requeue(outcome)
                return None
            self.attempts.append(self._summary(attempt, outcome))
            delay = self._retry_delay(outcome)
            if delay is None:
                return {**outcome.fields(), "attempts": self.attempts}
            retry_at = time.time() + delay
            self.emit({**outcome.fields(), "state": State.RETRYING.value,
                       "retrying_at": time.time(), "retry_at": retry_at,
                       "attempts": self.attempts})
            log.info("service %s attempt %d %s (%s); retrying in %.1f s", self.service_id,
                     self.attempt, outcome.state, outcome.error, delay)
            if self._sleep(delay):
                if self.interrupt_requested:
                    self._requeue(Outcome(INTERRUPTED, error="core stopped before a retry"))
                    return None
                return {"state": State.CANCELLED.value, "attempts": self.attempts,
                        "error": "cancelled while waiting to retry", "failure": None}
            with self._seq_lock:
                self.attempt += 1

    def _mark_finished(self, state: str) -> None:
        """Rewrite the run marker with the final state (an interrupted run keeps its
        ``running`` marker: the sweep counts it as abandoned once this core is gone)."""
        if self.marker is None:
            return
        service = self.current.service if self.current is not None else None
        outputs = [o["name"] for o in service.outputs] if service is not None else []
        try:
            markers.mark_finished(self.marker, state, outputs)
        except OSError:
            log.warning("cannot write the retention marker of %s", self.service_id, exc_info=True)

    def new_attempt(self) -> Attempt:
        """The next attempt (soaf.run.recovered's RecoveredRun finishes one a killed core began)."""
        return Attempt(self, self.attempt)

    def _retry_delay(self, outcome: Outcome) -> float | None:
        """Seconds before the next attempt, or None when this outcome is final."""
        if outcome.state not in (State.FAILED.value, State.TIMED_OUT.value):
            return None
        program = self.program_cls
        if program.retry_on is not None and outcome.failure not in program.retry_on:
            return None
        retries = getattr(self.template, "retries", None)
        if retries is None:
            retries = program.retries
        failed = sum(1 for a in self.attempts
                     if a.get("state") in (State.FAILED.value, State.TIMED_OUT.value))
        if failed > retries:
            return None
        base = getattr(self.template, "retry_backoff", None)
        if base is None:
            base = program.retry_backoff
        return float(min(base * 2 ** (failed - 1), program.retry_backoff_max))

    def _begin_retry(self) -> None:
        values: dict[str, Any] = dict.fromkeys(ATTEMPT_FIELDS)
        values.update({"state": State.BUILDING.value, "building_at": time.time(),
                       "node": self.settings.node, "plugin_version": self.registry.version})
        self.emit(values)

    def _summary(self, attempt: Attempt, outcome: Outcome) -> dict[str, Any]:
        process = attempt.process
        exit = process.exit if process is not None else None
        summary: dict[str, Any] = {
            "attempt": self.attempt, "state": outcome.state, "failure": outcome.failure,
            "error": outcome.error, "node": self.settings.node,
            "started_at": attempt.started_at, "ended_at": time.time(),
            "work_dir": str(attempt.work_dir) if attempt.work_dir else None,
        }
        if exit is not None:
            summary.update(exit_code=exit.exit_code, signal=exit.signal,
                           wall_time=round(exit.wall_time, 6))
        return summary

    def _requeue(self, outcome: Outcome) -> None:
        """Back to ``queued`` (no final state, entry not acknowledged): a core recovers it."""
        self.emit({"state": State.QUEUED.value, "queued_at": time.time(),
                   "requeued_because": outcome.error, "attempts": self.attempts})
