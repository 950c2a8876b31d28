"""Re-adopt what a killed core left running on this machine, so a crash of the core costs no
work: its programs keep running, and the restarted core watches them to their end.

A restarted core (same node name) finishes each attempt its predecessor had started, in
the same attempt, when the journal (soaf.run.journal) says how far it got:

* ``adopt``: the program still runs (verified by pid *and* start time). It is not this
  core's child, so it is watched through a pidfd, and its exit status is read from the
  exit file its spawner (soaf.process.spawnserver, which outlives the core) or its shim
  (soaf.process.shim) writes once it ends. The handler is a new instance:
  ``before_watch_callback`` runs again (``service.recovered`` is True), then
  ``file_change_callback`` as usual, and ``after_watch_callback`` once at the end;
* ``collect``: the program has ended while no core was there; its status comes from the
  journal or the exit file, and ``after_watch_callback`` runs once;
* the journal says ``collected``: the callback has run already, only the final state
  was lost; it is written without calling anything.
* ``ended``: the journal says the core died inside the same callback
  (``before_watch_callback``, ``file_change_callback`` or ``after_watch_callback``;
  ``in_call``, on disk only) for the second time in a row: the call is not made again;
  soaf.core.recovery ends the attempt ``failed`` (failure ``plugin``, "the core died
  twice in after_watch_callback"), over any ``max_lost``.

Lost for an adopted program: where it ran under the shim, its CPU time and peak memory
(only its parent could read them; the spawner writes them in the exit file) and, where
its spawner or shim was killed with it, its exit status (the run then fails with that
reason).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from soaf.process import shim
from soaf.process.adopted import AdoptedProcess
from soaf.process.identity import ProcIdentity
from soaf.process.lineage import RunLineage
from soaf.process.spawn import Exit
from soaf.protocol.state import ServiceRecord, State
from soaf.run.attempt import STDERR, STDOUT, Attempt
from soaf.run.control import Orphaned
from soaf.run.journal import Journal, RunJournal, remove_files
from soaf.run.outcome import Outcome
from soaf.run.prepare import PhaseError, make_program, phase_failed
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
                 previous_path: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.previous = previous
        #: Where the core that began the attempt kept its journal, if it was another node
        #: of this machine: removed with this run's own journal once the final is written.
        self.previous_node = previous.node
        self.previous_path = previous_path if previous.node != self.settings.node else None
        self.record = record
        self.identity = identity
        self.returncode = returncode

    #: Its first attempt is the one already under way: its fields stay on the record.
    continues_attempt = True

    def logs_finished(self, shipped: bool) -> None:
        """The core that began the attempt may have written its log stream: it always ages
        with the record."""

    @property
    def mode(self) -> str:
        if self.previous.final is not None:  # written by the run, or by the died-twice rule
            return "collected" if "collected" in self.previous.steps else "ended"
        return "adopt" if self.identity is not None else "collect"

    def _attempts(self, resume: Any) -> dict[str, Any] | None:
        if resume is None and self.attempt == self.claim.attempt and self.previous.final is not None:
            self.note()  # after_watch_callback has run: never call it again
            self.mark_collected()
            return {k: v for k, v in self.previous.final.items()
                    if k not in ("journal", "finished_at")}
        return super()._attempts(resume)

    def _final_written(self, applied: bool) -> None:
        if self.previous_path is not None:
            remove_files(self.previous_path, None)
        super()._final_written(applied)

    def new_attempt(self) -> Attempt:
        if self.attempt == self.claim.attempt:
            return RecoveredAttempt(self, self.attempt)
        return super().new_attempt()

    def note(self) -> None:
        """Start from the previous core's journal; say on the record what is done."""
        prev = self.previous
        self.journal = RunJournal(self.settings.work_root, self.settings.node, self.service_id,
                                  self.claim.attempt, journal=prev)
        note: dict[str, Any] = {"node": self.settings.node, "recovered_at": time.time(),
                                "recovered_as": self.mode, "recovered_from": self.previous_node}
        if self.record.state != State.RUNNING.value and prev.running_at is not None:
            note.update(state=State.RUNNING.value, running_at=prev.running_at)
        if self.identity is not None:
            note["pid"] = self.identity.pid
        self.emit(note)
        log.info("service %s attempt %d: %s after its core (%s) stopped", self.service_id,
                 self.claim.attempt, {"adopt": "re-adopted the running program",
                                      "collect": "collecting the program that ended meanwhile",
                                      "collected": "writing the final state that was lost",
                                      "ended": "ending it without the plugin call it died in"
                                      }[self.mode], self.previous_node)


class RecoveredAttempt(Attempt):
    """The attempt a killed core began: its program is adopted (or collected), then
    ``after_watch_callback`` runs once and the outputs are collected, as in any attempt.
    It ends through the same path as any attempt (``Attempt._follow``, ``record_exit``,
    ``_ended``, ``_after_watch``, ``_collect``); its timeout, memory limit and a cancel
    are enforced like any program's."""

    adopted = True

    def __init__(self, run: RecoveredRun, number: int) -> None:
        super().__init__(run, number)
        self.run_ = run
        if run.previous.run_token:  # what its program left is no child of this core
            self.lineage = RunLineage(run.previous.run_token, anywhere=True)

    def run(self) -> Outcome:
        run, prev = self.run_, self.run_.previous
        run.note()
        assert prev.work_dir is not None
        self.work_dir = Path(prev.work_dir)
        self.service = self._new_service()
        self.service.restore(run.record.fields, run.record.progress, run.record.message)
        step = "handler"
        try:
            self.handler = self.call(step, run.plugin.handler_cls)
            step = "program"  # no build(): only to collect the outputs in the end
            self.program = self.call(step, lambda: make_program(
                run, self.number, self.work_dir, self.service))
        except Orphaned:
            raise
        except BaseException as e:  # a plugin may raise SystemExit too
            return phase_failed(self.template.service_id, PhaseError(step, e))
        self.limits.set_handler(self.handler)
        if run.identity is not None:
            return self._collect(self._after_watch(self._adopt(run.identity)))
        code = run.returncode
        # The spawner's exit file also tells what it cost (the shim's does not).
        ended = shim.read_exit_usage(Path(prev.exit_file)) if prev.exit_file else None
        cpu, rss = ended[1:] if ended is not None and ended[0] == code else (None, None)
        self.collected_exit = (Exit(returncode=code, wall_time=0.0, cpu_time=cpu or 0.0,
                                    max_rss_kb=rss or 0, usage_known=cpu is not None)
                               if code is not None else None)
        self.record_exit()
        return self._collect(self._after_watch(self._outcome()))

    def _adopt(self, identity: ProcIdentity) -> Outcome:
        prev = self.run_.previous
        assert self.work_dir is not None
        process = AdoptedProcess(
            identity, exit_file=Path(prev.exit_file) if prev.shimmed and prev.exit_file
            else None, running_at=prev.running_at)
        process.on_exit(self._exited)
        self.limits.started(ran_for=time.time() - (prev.running_at or time.time()))
        self._keep_logs(self.work_dir / STDOUT, self.work_dir / STDERR)
        self.process = process  # from here on the enforcer enforces the limits
        process.start()
        return self._follow(process)
