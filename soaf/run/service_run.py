"""ServiceRun: one service from claim to final state, in a thread of its own (one kept
from an ended run when there is one: soaf.run.threads).

Its thread runs the plugin code inline. If that code hangs, the core's limit enforcer
(``tick``, from soaf.core.enforcer) takes the run over (soaf.run.control): a new thread
finishes the attempt (``Attempt.resume``) and goes on with the run; the stuck thread
finds, if its call ever returns, that it is no longer the owner (``Orphaned``) and ends.

A run is a series of attempts (soaf.run.attempt): the first, then, when the service opted
into retries, one more after each failed or timed-out attempt, after a backoff, while
retries are left. Each attempt is recorded in the ``attempts`` field. The final state
is written once, and it acknowledges the stream entry; once it is in Redis
(``final_written``) the attempt's journal (soaf.run.journal) is removed. A final that a
newer attempt elsewhere fenced out acknowledges nothing (soaf.core.writer). Whatever a
plugin raises ends an attempt as ``failed`` with the error and traceback, never the core.

When the core stops without draining (``interrupt()``), the program is stopped but no
final state is written: the record goes back to ``queued`` and the stream entry stays
unacknowledged, so the service is run again when a core recovers it.

Data (docs/data.md): each attempt writes a run marker (soaf/data/markers.py) when it takes
its work dir; the run rewrites the last one with the final state and outputs. ``soaf://``
inputs are resolved through ``lookup`` (another service's record).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from soaf.data import markers
from soaf.data.handoff import resolve_ref
from soaf.errors import FetchError
from soaf.plugin.loader import Registry
from soaf.process.latch import Latch
from soaf.protocol.state import Change, State
from soaf.protocol.template import ServiceParamTemplate
from soaf.run import cached
from soaf.run.attempt import Attempt
from soaf.run.claim import Claim
from soaf.run.control import CallGuard, Halt, Once, Orphaned
from soaf.run.journal import RunJournal, needs_note
from soaf.run.outcome import INTERRUPTED, Outcome
from soaf.run.policy import RETRYABLE, policy_for
from soaf.run.ports import Engines, PluginClasses
from soaf.run.threads import RUN_THREADS

log = logging.getLogger(__name__)
_NOTHING = contextlib.nullcontext()

#: Fields that describe one attempt; cleared when the next attempt starts.
ATTEMPT_FIELDS = (
    "pid", "shim_pid", "command", "exit_code", "signal", "stopped_with", "wall_time", "cpu_time",
    "max_rss_kb", "exited_at", "error", "failure", "failed_in", "traceback", "progress", "eta",
    "message", "callback_error", "callback_traceback", "callback_errors", "running_at",
    "preparing_at", "stdout_bytes", "stderr_bytes", "stdout_dropped_bytes",
    "stderr_dropped_bytes", "missing_outputs", "inputs", "outputs", "output_target",
    "lost_at", "lost_reason", "requeued_because", "recovered_at", "recovered_as",
    "recovered_from", "exit_status_known", "retrying_at", "retry_at",
)


class ServiceRun:
    """Runs one service; ``start()`` spawns its thread, ``cancel()``/``interrupt()`` anytime.

    Its attempts (soaf.run.attempt) see it only through the small ``AttemptHost``
    interface: they report what they produce (changes, journal steps, their marker)
    and never write into the run."""

    #: False: the claim starts a new attempt, so what an earlier attempt left on the
    #: record (exit code, signal, pid ...) is cleared; it is in ``attempts``.
    continues_attempt = False

    def __init__(self, template: ServiceParamTemplate, claim: Claim, *, registry: Registry,
                 engines: Engines) -> None:
        self.template = template
        self.claim = claim
        self.engines = engines
        self.settings = engines.settings
        self.service_id = template.service_id
        self.plugin = PluginClasses(program_cls=registry.program(template.service),
                                    handler_cls=registry.handler(template.service),
                                    version=registry.version, digest=registry.digest)
        self.policy = policy_for(template, self.plugin.program_cls)
        self.attempt = claim.attempt
        self.attempts: list[dict[str, Any]] = list(claim.attempts)
        self.current: Attempt | None = None
        enforcer = engines.enforcer
        self.halt = Halt(on_halt=enforcer.poke if enforcer is not None else None)
        self.guard = CallGuard()
        self._seq = claim.seq - 1 if claim.building else claim.seq
        self._seq_lock = threading.Lock()
        self._closed = False
        self._building: dict[str, Any] | None = None  # (see ``emit``)
        #: True once an attempt's output is all shipped and none of it went to the log
        #: stream (None: not known, e.g. no program ran or its logs are not finished).
        self._quiet: bool | None = None
        #: The run marker of the last attempt that took a work dir.
        self._marker: markers.Marker | None = None
        #: The journal (soaf.run.journal) of the attempt under way, from the moment its
        #: work dir exists; each attempt starts its own.
        self.journal: RunJournal | None = None
        #: Set when a newer attempt took this service over (this core was thought dead):
        #: the program is stopped, after_watch_callback is not called, writes are fenced.
        self.superseded = False
        #: The result cache key of this run (soaf.run.cached), None when it is not cached.
        self.cache_key: str | None = None
        #: Set once the final state is in Redis (or fenced out); ``on_final_written`` first.
        self.final_written = Latch()
        self.on_final_written = Once()

    @property
    def work_dir(self) -> Path | None:
        """The current attempt's work dir (the sweep leaves it alone), once taken."""
        current = self.current
        return current.work_dir if current is not None else None

    @property
    def cancel_requested(self) -> bool:
        return self.halt.cancel_requested

    @property
    def interrupt_requested(self) -> bool:
        return self.halt.interrupt_requested

    @property
    def force(self) -> bool:
        return self.halt.force

    def start(self) -> None:
        if self.engines.enforcer is not None:
            self.engines.enforcer.add(self)
        RUN_THREADS.start(self._run, f"soaf-svc-{self.service_id[:12]}")

    def cancel(self) -> None:
        """Stop the service for good: it ends ``cancelled``."""
        self.halt.cancel()

    def interrupt(self, *, force: bool = False) -> None:
        """The core is stopping: stop the program, leave the service for recovery.

        With ``force``, waits for nothing (no grace period, no after_watch_callback)."""
        self.halt.interrupt(force=force)

    def supersede(self, attempt: int) -> None:
        """A newer attempt (``attempt``) of this service exists: another core took it
        over while this one could not renew its heartbeat. Stop the program; write
        nothing more."""
        if self.superseded:
            return
        log.error("service %s: attempt %d was taken over by attempt %d elsewhere (this core "
                  "missed its heartbeats); stopping its program", self.service_id,
                  self.attempt, attempt)
        self.superseded = True
        self.cancel()

    # -- what an attempt asks of its run (AttemptHost) -------------------------------------

    @property
    def last_state(self) -> str | None:
        """How the previous attempt ended (None before the first one has)."""
        return self.attempts[-1].get("state") if self.attempts else None

    def resolve(self, ref: str) -> Path | str:
        """Where a ``soaf://`` input is: a local path or the URL it was uploaded to."""
        if self.engines.lookup is None:
            raise FetchError(ref, "this core cannot read other services' records")
        return resolve_ref(ref, lookup=self.engines.lookup, work_root=self.settings.work_root)

    def still_current(self) -> bool:
        """False once a newer attempt elsewhere has the service (then it is superseded)."""
        check = self.engines.still_current
        if not self.superseded and check is not None and not check(self):
            self.superseded = True
        return not self.superseded

    def emit(self, values: dict[str, Any], *, attempt: int | None = None,
             final: bool = False, with_building: bool = False) -> None:
        """Queue a change of the record. Changes from an attempt that is over (a callback
        abandoned earlier that returns late) or after the final state are dropped.

        The ``building`` change of a new run waits for the next one: ``with_building``
        (the attempt's work dir, a moment later) joins it, one change and event instead
        of two; any other goes after it, as its own."""
        with self._seq_lock:
            if self._closed or (attempt is not None and attempt != self.attempt):
                log.debug("dropping a late change of %s: %s", self.service_id, list(values))
                return
            building, self._building = self._building, None
            if building is not None:
                if with_building:
                    values = {**building, **values}
                else:
                    self._seq += 1
                    self.engines.writer.put(Change(self.service_id, self.attempt, self._seq,
                                                   building))
            self._seq += 1
            self.engines.writer.put(Change(self.service_id, self.attempt, self._seq, values,
                                           ack=self.claim.entry_id if final else None,
                                           on_written=self._final_written if final else None,
                                           logs=not (self._quiet and self.attempt == 1)))
            if final:
                self._closed = True

    def new_journal(self, number: int, work_dir: Path | None) -> RunJournal:
        """Start attempt ``number``'s journal; the last attempt's one is done with."""
        if self.journal is not None and self.journal.data.attempt != number:
            self.journal.remove()
        self.journal = RunJournal(self.settings.work_root, self.settings.node, self.service_id,
                                  number, work_dir)
        return self.journal

    def journal_step(self, step: str, *, save: bool = False, **info: Any) -> dict[str, Any]:
        """Record ``step`` in the attempt's journal; the values to write with it."""
        if self.journal is None:
            return {}
        return self.journal.try_step(step, **info) if save else self.journal.step(step, **info)

    def journaled(self, name: str, handler: object | None = None
                  ) -> contextlib.AbstractContextManager[None]:
        """Note on disk that plugin call ``name`` (of ``handler``) is under way, if it is
        one of the (rare) JOURNALED_CALLS, in plugin code (``needs_note``); else nothing."""
        journal = self.journal
        if journal is None or not needs_note(name, handler):
            return _NOTHING
        return journal.noting(name)

    def logs_finished(self, shipped: bool) -> None:
        """An attempt's output is all shipped: a run whose only attempt wrote no line to
        the log stream has none to age with its record."""
        self._quiet = not shipped and self._quiet is not False

    def mark_collected(self) -> None:
        """after_watch_callback has run: a core that recovers the run never calls it again."""
        if self.journal is not None:
            self.journal.collected = True

    # -- supervision (the limit enforcer's thread) ----------------------------------------

    @property
    def settled(self) -> bool:
        """Its program's pid is known and its first samples taken: ticked less often."""
        return bool(getattr(self.current, "settled", True))

    @property
    def fast(self) -> bool:
        """Its program has a memory limit: the enforcer looks at it more often."""
        return self.policy.max_memory_kb is not None

    def tick(self, now: float) -> None:
        """Enforce the program's limits; take over from a thread stuck in plugin code."""
        attempt = self.current
        if attempt is not None:
            attempt.enforce(now)
        stuck = self.guard.take_over(
            now, lambda name, started, owner: owner.deadline_for(name, started))
        if stuck is None:
            return
        name, owner = stuck
        log.warning("service %s: %s has not returned; a new thread finishes attempt %d",
                    self.service_id, name, owner.number)
        threading.Thread(target=self._run, kwargs={"resume": (owner, name)}, daemon=True,
                         name=f"soaf-svc-{self.service_id[:12]}-g{self.guard.generation}").start()

    # -- the run ------------------------------------------------------------------------

    @property
    def final_queued(self) -> bool:
        """The final state has been handed to the writer (it may not be in Redis yet)."""
        return self._closed

    def _final_written(self, applied: bool) -> None:
        if self.journal is not None:
            self.journal.remove()
        self.on_final_written.fire()
        self.final_written.set()

    def _run(self, resume: tuple[Attempt, str] | None = None) -> None:
        final: dict[str, Any] | None
        if resume is None and self.claim.building:
            with self._seq_lock:  # written with the next change (see ``emit``)
                self._building = {"state": State.BUILDING.value, "node": self.settings.node}
        try:
            final = self._cached() if resume is None else None
            if final is None:
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
            if self.cache_key is not None and "cached_from" not in final:
                # Before the final state: whoever sees it succeeded finds its entry.
                cached.keep(self.engines.results, self.template, self.cache_key, final["state"])
            self.emit(final, final=True)
            log.info("service %s %s", self.service_id, final["state"])
        if self.engines.enforcer is not None:
            self.engines.enforcer.remove(self)
        try:
            self.engines.on_done(self)
        except Exception:
            log.exception("on_done failed for %s", self.service_id)
        self.current = None  # over: no cycle through its attempt outlives the run

    def _cached(self) -> dict[str, Any] | None:
        """The final values when the result cache answers this (fresh) run, else None."""
        if self.continues_attempt or self.claim.attempt != 1:
            return None
        self.cache_key, final = cached.answer(self.template, self.plugin, self.engines, self.resolve)
        if self.cache_key is not None:
            self.emit({"cache_key": self.cache_key})
        return final

    def _attempts(self, resume: tuple[Attempt, str] | None) -> dict[str, Any] | None:
        while True:
            if resume is not None:
                attempt, stuck = resume
                resume = None
                outcome = attempt.resume(stuck)
            else:
                if self.attempt > self.claim.attempt:
                    self._begin_retry()
                elif self.attempt > 1 and not self.continues_attempt:
                    self.emit(dict.fromkeys(ATTEMPT_FIELDS))  # after a lost attempt
                attempt = self.new_attempt()
                self.current = attempt
                outcome = attempt.run()
            if attempt.marker is not None:
                self._marker = attempt.marker
            if outcome.state == INTERRUPTED:
                self.attempts.append({**attempt.summary(outcome), "state": "lost"})
                self._requeue(outcome)
                return None
            self.attempts.append(attempt.summary(outcome))
            failed = sum(1 for a in self.attempts if a.get("state") in RETRYABLE)
            delay = self.policy.retry_delay(outcome.state, outcome.failure, failed)
            if delay is None:
                return {**outcome.fields(), "attempts": self.attempts}
            retry_at = time.time() + delay
            self.emit({**outcome.fields(), "state": State.RETRYING.value,
                       "retrying_at": time.time(), "retry_at": retry_at,
                       "attempts": self.attempts})
            log.info("service %s attempt %d %s (%s); retrying in %.1f s", self.service_id,
                     self.attempt, outcome.state, outcome.error, delay)
            if self.halt.sleep(delay):
                if self.halt.interrupt_requested:
                    self._requeue(Outcome(INTERRUPTED, error="core stopped before a retry"))
                    return None
                return {"state": State.CANCELLED.value, "attempts": self.attempts,
                        "error": "cancelled while waiting to retry", "failure": None}
            with self._seq_lock:
                self.attempt += 1

    def _mark_finished(self, state: str) -> None:
        """Rewrite the run marker with the final state (an interrupted run keeps its
        ``running`` marker: the sweep counts it as abandoned once this core is gone)."""
        if self._marker is None:
            return
        service = self.current.service if self.current is not None else None
        outputs = [o["name"] for o in service.outputs] if service is not None else []
        try:
            markers.mark_finished(self._marker, state, outputs)
        except OSError:
            log.warning("cannot write the retention marker of %s", self.service_id, exc_info=True)

    def new_attempt(self) -> Attempt:
        """The next attempt (soaf.run.recovered's RecoveredRun finishes one a killed core began)."""
        return Attempt(self, self.attempt)

    def _begin_retry(self) -> None:
        values: dict[str, Any] = dict.fromkeys(ATTEMPT_FIELDS)
        values.update({"state": State.BUILDING.value, "building_at": time.time(),
                       "node": self.settings.node, "plugin_version": self.plugin.version})
        self.emit(values)

    def _requeue(self, outcome: Outcome) -> None:
        """Back to ``queued`` (no final state, entry not acknowledged): a core recovers it."""
        self.emit({"state": State.QUEUED.value, "queued_at": time.time(),
                   "requeued_because": outcome.error, "attempts": self.attempts})
