"""Re-adopt what a killed core left running on this machine, so a crash of the core costs no
work: its programs keep running, and the restarted core watches them to their end.

A restarted core (same node name) finishes each attempt its predecessor had started, in
the same attempt, when the journal (soaf.run.journal) says how far it got:

* ``adopt``: the program still runs (verified by pid *and* start time). It is not this
  core's child, so it is watched through a pidfd, and its exit status is read from the
  shim's exit file (soaf.process.shim) once it ends. The handler is a new instance:
  ``before_watch_callback`` runs again (``service.recovered`` is True), then
  ``file_change_callback`` as usual, and ``after_watch_callback`` once at the end;
* ``collect``: the program has ended while no core was there; its status comes from the
  journal or the exit file, and ``after_watch_callback`` runs once;
* the journal says ``collected``: the callback has run already, only the final state
  was lost; it is written without calling anything.

Lost for an adopted program: its CPU time and peak memory (only its parent could read
them) and, where the shim was killed with it, its exit status (the run then fails with
that reason).
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

from soaf.plugin.service import Service
from soaf.process.adopted import AdoptedProcess
from soaf.process.identity import ProcIdentity
from soaf.process.spawn import Exit
from soaf.protocol.state import ServiceRecord, State
from soaf.run.attempt import STDERR, STDOUT, Attempt, Orphaned, PhaseError
from soaf.run.callbacks import watch
from soaf.run.journal import Journal, RunJournal
from soaf.run.outcome import Outcome
from soaf.run.service_run import ServiceRun

log = logging.getLogger(__name__)


class RecoveredRun(ServiceRun):
    """Finishes, in the same attempt, a run that a killed core of this node started here
    (or, when only its final write was lost, a verifiably dead core of this machine).

    ``identity`` set: adopt the running program. Otherwise collect an ended one, whose
    ``returncode`` (None: unknown) the caller found in the journal or the exit file.
    Should that attempt fail and retries be left, the next attempts run as usual.
    """

    def __init__(self, *args: Any, previous: Journal, record: ServiceRecord,
                 identity: ProcIdentity | None = None, returncode: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.previous = previous
        self.record = record
        self.identity = identity
        self.returncode = returncode

    @property
    def mode(self) -> str:
        if self.previous.final is not None:
            return "collected"
        return "adopt" if self.identity is not None else "collect"

    def _attempts(self, resume: Any) -> dict[str, Any] | None:
        if resume is None and self.attempt == self.claim.attempt and self.previous.final is not None:
            self._note()  # after_watch_callback has run: never call it again
            assert self.journal is not None
            self.journal.collected = True
            return {k: v for k, v in self.previous.final.items()
                    if k not in ("journal", "finished_at")}
        return super()._attempts(resume)

    def new_attempt(self) -> Attempt:
        if self.attempt == self.claim.attempt:
            return RecoveredAttempt(self, self.attempt)
        return super().new_attempt()

    def _note(self) -> None:
        """Start from the previous core's journal; say on the record what is done."""
        prev = self.previous
        self.journal = RunJournal(self.settings.work_root, self.settings.node, self.service_id,
                                  self.claim.attempt, journal=prev)
        note: dict[str, Any] = {"node": self.settings.node, "recovered_at": time.time(),
                                "recovered_as": self.mode}
        if self.record.state != State.RUNNING.value and prev.running_at is not None:
            note.update(state=State.RUNNING.value, running_at=prev.running_at)
        if self.identity is not None:
            note["pid"] = self.identity.pid
        self.emit(note)
        log.info("service %s attempt %d: %s after its core stopped", self.service_id,
                 self.claim.attempt, {"adopt": "re-adopted the running program",
                                      "collect": "collecting the program that ended meanwhile",
                                      "collected": "writing the final state that was lost"
                                      }[self.mode])


class RecoveredAttempt(Attempt):
    """The attempt a killed core began: its program is adopted (or collected), then
    ``after_watch_callback`` runs once, as in any attempt."""

    run_: RecoveredRun
    _exit: Exit | None = None  # a collected program's exit, as the journal or shim left it

    def run(self) -> Outcome:
        run, prev = self.run_, self.run_.previous
        run._note()
        assert prev.work_dir is not None
        self.work_dir = Path(prev.work_dir)
        self.service = Service(self.template, self.work_dir, attempt=self.number,
                               node=self.settings.node, plugin_version=run.registry.version,
                               emit=self.emit)
        self.service.restore(run.record.fields, run.record.progress, run.record.message)
        try:
            self.handler = self.call("handler", run.handler_cls)
        except Orphaned:
            raise
        except BaseException as e:  # a plugin may raise SystemExit too
            return self._phase_failed(PhaseError("handler", e))
        if run.identity is not None:
            return self._after_watch(self._adopt(run.identity))
        code = run.returncode
        self._exit = (Exit(returncode=code, wall_time=0.0, cpu_time=0.0, max_rss_kb=0)
                      if code is not None else None)
        self.record_exit()
        return self._after_watch(self._recovered_outcome())

    def _adopt(self, identity: ProcIdentity) -> Outcome:
        run, prev = self.run_, self.run_.previous
        assert self.work_dir is not None and self.service is not None
        process = AdoptedProcess(
            identity, exit_file=Path(prev.exit_file) if prev.shimmed and prev.exit_file
            else None, running_at=prev.running_at)
        process.on_exit(self._adopted_exit)
        timeout = (self.template.timeout if self.template.timeout is not None
                   else self.program_cls.timeout)
        if timeout is not None:
            ran = time.time() - (prev.running_at or time.time())
            self._timeout = float(timeout)
            self._deadline = time.monotonic() + max(0.0, float(timeout) - ran)
        if run.keeper is not None:
            self._logs = run.keeper.add(self.template.service_id, self.number, {
                "stdout": self.work_dir / STDOUT, "stderr": self.work_dir / STDERR})
        self.process = process  # type: ignore[assignment]  # the supervisor enforces limits
        process.start()
        watch(self.handler, self.service, process, self.call,  # type: ignore[arg-type]
              wake=run.wake, file_poll=self.settings.file_poll)
        process.exited.wait()
        return self._ended()

    def _adopted_exit(self, exit: Exit | None) -> None:
        self.exited_at = time.monotonic()
        if self.service is not None and exit is not None:
            self.service.exit = exit
        with self.run_.lock:
            busy = self.run_.in_call is not None
        if busy:
            self.record_exit()
        self.run_.wake.set()

    def _known_exit(self) -> Exit | None:
        process = self.process
        if process is not None:
            return process.exit
        return getattr(self, "_exit", None)

    def record_exit(self, extra: dict[str, Any] | None = None) -> bool:
        """How the program ended, once: only what a core that is not its parent can know
        (no CPU time or peak memory; the status only if the shim left it)."""
        if self.process is not None and not self.process.exited.is_set():
            return False
        with self._logs_lock:
            if self._exit_recorded:
                return False
            self._exit_recorded = True
        exit = self._known_exit()
        values: dict[str, Any] = {"exited_at": time.time(), "cpu_time": None, "max_rss_kb": None,
                                  "exit_status_known": exit is not None}
        if exit is not None:
            values.update(exit_code=exit.exit_code, signal=exit.signal,
                          wall_time=round(exit.wall_time, 6))
        process = self.process
        if process is not None and process.stopped_with:
            values["stopped_with"] = process.stopped_with
        values.update(self.run_.journal_step("exited", exit={
            "returncode": exit.returncode if exit else None,
            "wall_time": values.get("wall_time")}))
        self.emit({**values, **(extra or {})})
        return True

    def _ended(self) -> Outcome:
        with self._logs_lock:
            logs, self._logs = self._logs, None
        stats: dict[str, Any] = {}
        if logs is not None:
            stats = self.run_.keeper.finish(logs)  # type: ignore[union-attr]
        if not self.record_exit(stats) and stats:
            self.emit(stats)
        return self._recovered_outcome()

    def _recovered_outcome(self) -> Outcome:
        exit, reason = self._known_exit(), self.stop_reason
        if exit is None and reason is None:
            return Outcome(State.FAILED.value, "exit_status",
                           "the program ended while its core was down and left no exit "
                           "status (its shim was killed too)")
        if exit is None:  # stopped for a reason; the reason decides the outcome
            exit = Exit(returncode=-signal.SIGTERM, wall_time=0.0, cpu_time=0.0, max_rss_kb=0)
        return self._classify(exit, reason)
