"""One attempt of a service: work dir, build, prepare, spawn, watch, after_watch, outcome.

The service's thread runs the attempt, plugin code included, with every plugin call made through
``call()``, which tells the run what is under way (soaf.run.control). The core's limit enforcer
(soaf.core.enforcer) stops the program when it must (``enforce``, with soaf.run.limits), and
takes the attempt over in a fresh thread (``resume``) when a plugin call overstays
(``deadline_for``). The attempt sees its run only through the ``AttemptHost`` interface
(soaf.run.ports) and returns what it produced: its Outcome, its ``summary`` and its run
``marker``. The program's exit is recorded the moment the reaper sees it (``_exited``), whatever
the plugin code is doing. ``after_watch_callback`` runs exactly once per attempt (unless the
core is forced down), whatever happened before it, and never once a newer attempt elsewhere has
taken the service over (``still_current``); then ``settle`` applies ``fail_on_callback_error``
and full progress. The attempt ends in an ``Outcome`` (soaf.run.outcome).

Data (docs/data.md): the work dir and the steps before the program starts are
soaf.run.prepare's; ``prepare_input_file`` stages the inputs; after ``after_watch_callback``,
and only when the attempt has succeeded so far, ``collect_output_files`` checks, records and
uploads the outputs (a missing one fails the attempt: ``failure: missing_outputs``).

Its steps (built, prepared, running with the program's identity, exited, collected) go to the
run's journal (soaf.run.journal), and the program is spawned by the core's spawner
(soaf.process.spawner; else it runs under the shim, soaf.process.shim), which leaves its exit
status in a file: a core restarted after a crash finishes the attempt from there
(soaf.run.recovered) instead of running it again. A spawned program and an adopted one end
through the same path (``record_exit``, ``_ended``).
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from soaf.config import host_name
from soaf.data import markers, workdir
from soaf.errors import MissingOutputError, ProgramError, TransferStopped
from soaf.plugin.service import Service
from soaf.process.census import RUN_VAR
from soaf.process.identity import ProcIdentity
from soaf.process.lineage import RunLineage, new_token
from soaf.process.spawn import Exit, Process
from soaf.protocol.state import State
from soaf.run.callbacks import FAILED, call_callback, callback_loop, counted
from soaf.run.control import Orphaned
from soaf.run.limits import AFTER, COLLECT, PREPARE_STEPS, WATCH_CALLBACKS, Limits
from soaf.run.outcome import Outcome, attempt_summary, classify, exit_fields, settle, with_stderr
from soaf.run.ports import AttemptHost
from soaf.run.prepare import (
    Halted,
    PhaseError,
    Preparation,
    halted,
    outputs_escape,
    phase_failed,
    stopped_collecting,
    take_work_dir,
)

log = logging.getLogger(__name__)

STDOUT, STDERR = "stdout.log", "stderr.log"


class Attempt:
    """Attempt number ``number`` of ``host``'s service; ``run()`` returns its Outcome."""

    #: True for an attempt whose program this core did not spawn (soaf.run.recovered):
    #: only its parent could know its CPU time and peak memory.
    adopted = False

    def __init__(self, host: AttemptHost, number: int) -> None:
        self.host = host
        self.number = number
        self.template = host.template
        self.settings = host.engines.settings
        self.program_cls = host.plugin.program_cls
        self.limits = Limits(host.policy, host.halt, self.settings)
        self.started_at = time.time()
        self.work_dir: Path | None = None
        #: The run marker of this attempt's work dir (soaf.data.markers), once taken.
        self.marker: markers.Marker | None = None
        self.handler: Any = None
        self.program: Any = None
        self.step = ""  # the last plugin call made
        self.service: Service | None = None
        self.process: Any = None  # a Process, or an AdoptedProcess
        self.argv: list[str] | None = None  # the command as the plugin gave it (no shim)
        self.exited_at: float | None = None  # monotonic
        self.outcome: Outcome | None = None  # as known before after_watch_callback
        #: The exit of a program that ended while no core watched it (recovered attempts).
        self.collected_exit: Exit | None = None
        self._logs: Any = None
        self._last_look: list[str] | None = None  # the work dir's files after the end
        self._logs_lock = threading.Lock()
        self._exit_recorded = False
        self._started = threading.Lock()
        self.shimmed = False
        self.pid_known = True  # the record has the program's pid (a shimmed one: at a tick)
        self.lineage = RunLineage(new_token(self.template.service_id, number))

    def emit(self, values: dict[str, Any]) -> None:
        self.host.emit(values, attempt=self.number)

    def call(self, name: str, fn: Any, *args: Any) -> Any:
        """Run plugin code in this thread, letting the limit enforcer know it is under way."""
        self.step = name
        with self.host.journaled(name, self.handler):  # a core dying in it leaves this on disk
            return self.host.guard.call(name, self, fn, *args)

    def summary(self, outcome: Outcome) -> dict[str, Any]:
        """This attempt's entry in the record's ``attempts`` list."""
        return attempt_summary(outcome, self.number, self.settings.node, self.started_at,
                               self.work_dir, self.known_exit())

    # -- the attempt, in the service's thread --------------------------------------------

    def run(self) -> Outcome:
        try:
            self.work_dir, self.marker = take_work_dir(
                self.settings, self.template, self.number,
                policy=self.program_cls.work_dir_policy, last_state=self.host.last_state)
        except Exception as e:
            return Outcome(State.FAILED.value, "plugin", f"work dir: {e}", {"failed_in": "work dir"})
        self.host.emit({"work_dir": str(self.work_dir), "host": host_name()},
                       attempt=self.number, with_building=True)
        journal = self.host.new_journal(self.number, self.work_dir)
        self.service = self._new_service()
        prep = Preparation(self.host, self.number, self.work_dir, self.service, self.call,
                           on_handler=self._got_handler)
        outcome: Outcome | None = None
        try:
            argv, env, cwd = prep.run()
        except Halted:
            outcome = halted(self.host.halt, prep.step)
        except PhaseError as e:
            outcome = phase_failed(self.template.service_id, e)
        self.handler, self.program = prep.handler, prep.program
        if outcome is None:
            argv = [str(a) for a in argv] if isinstance(argv, (list, tuple)) else argv
            self.argv = list(argv) if isinstance(argv, list) else None
            journal.step("prepared", run_token=self.lineage.token)
            # Every process of the run carries its token, to be found and ended with it.
            env = {**env, RUN_VAR: self.lineage.token}
            # The spawner (or the shim) records the exit status in a file, for a core that
            # restarts meanwhile.
            group = self.limits.enter_cgroup(self.host.engines.cgroups,
                                             f"{self.template.service_id}.{self.number}")
            process = Process(
                argv,
                cwd=Path(cwd), env=env, stdout=self.work_dir / STDOUT,
                stderr=self.work_dir / STDERR, exit_file=journal.exit_file, cgroup=group)
            outcome = self._spawn(process)
            if outcome.state == State.SUCCEEDED.value:
                escape = outputs_escape(self.settings, self.work_dir, self.template)
                if escape is not None:
                    outcome = Outcome(State.FAILED.value, "confinement", escape)
        return self._collect(self._after_watch(outcome))

    def _got_handler(self, handler: Any) -> None:
        """The handler exists: after_watch_callback runs even if a later step hangs and
        another thread finishes the attempt."""
        self.handler = handler
        self.limits.set_handler(handler)

    def _new_service(self) -> Service:
        assert self.work_dir is not None
        # (the run's emit, not this attempt's: a service holding its attempt back is a cycle)
        return Service(self.template, self.work_dir, attempt=self.number,
                       node=self.settings.node, plugin_version=self.host.plugin.version,
                       emit=functools.partial(self.host.emit, attempt=self.number))

    # -- the program --------------------------------------------------------------------

    def _spawn(self, process: Process) -> Outcome:
        process.on_exit(self._exited)
        # Output counts from before the start: a short program may have written all of it
        # (and ended) by the time the start returns.
        self._keep_logs(process.stdout_path, process.stderr_path)
        with self._started:  # the exit is recorded after "running", however fast it comes
            try:
                process.start(self.host.engines.reaper)
            except ProgramError as e:
                self._finish_logs()
                return Outcome(State.FAILED.value, "start", str(e), {"failed_in": "start"})
            self.shimmed = process.shimmed
            self.limits.started()
            self.process = process  # from here on the enforcer enforces the limits
            assert process.pid is not None
            identity = ProcIdentity.of(process.pid)
            now = time.time()
            # ``pid`` is the program's; a shimmed one's is known once the shim forked it
            # (usually by now, else at its first sample: ``enforce``).
            self.pid_known = process.usage.find(process.pid) is not None
            self.emit({"state": State.RUNNING.value, "running_at": now, "pid": process.program_pid,
                       "shim_pid": process.pid if self.shimmed else None,
                       "command": self.argv if self.argv is not None else list(process.argv),
                       **self.host.journal_step(  # (``shimmed``: an exit file says how it ended)
                           "running", save=True, shimmed=self.shimmed or process.spawned,
                           running_at=now, process=identity.to_dict() if identity else None)})
        return self._follow(process)

    def _keep_logs(self, stdout: Path, stderr: Path) -> None:
        keeper = self.host.engines.keeper
        if keeper is not None:
            self._logs = keeper.add(self.template.service_id, self.number,
                                    {"stdout": stdout, "stderr": stderr})

    def _finish_logs(self) -> dict[str, Any]:
        """Ship the rest of the program's output; the files' sizes (either thread)."""
        with self._logs_lock:
            logs, self._logs = self._logs, None
        keeper = self.host.engines.keeper
        if logs is None or keeper is None:
            return {}
        stats = keeper.finish(logs)
        self.host.logs_finished(logs.shipped > 0)
        return stats

    def _follow(self, process: Any) -> Outcome:
        """Call the handler's callbacks until the program ends; how it ended."""
        assert self.service is not None
        if not self.pid_known:  # the shim may have forked the program by now
            process.usage.find(process.pid)
        self._last_look = callback_loop(self.handler, self.service, process, self.call,
                                        wake=self.host.halt.wake, file_poll=self.settings.file_poll)
        process.exited.wait()
        return self._ended()

    def _exited(self, exit: Exit | None) -> None:
        """The program ended (reaper or pidfd thread). If this attempt's thread is in
        plugin code, record the exit now; else that thread does, in a moment, sparing
        a hand-over between threads."""
        with self._started:
            pass
        self.exited_at = time.monotonic()
        if self.service is not None and exit is not None:
            self.service.exit = exit
        if self.host.guard.busy:
            self.record_exit()
        self.host.halt.wake.set()

    def known_exit(self) -> Exit | None:
        """How the program ended, as far as this core can know."""
        process = self.process
        return process.exit if process is not None else self.collected_exit

    def record_exit(self, extra: dict[str, Any] | None = None) -> bool:
        """Write how the program ended, once (whichever thread comes first); False if it
        was written already or has not happened. An adopted program's record says only
        what a core that is not its parent can know."""
        process = self.process
        if process is None and not self.adopted:
            return False
        if process is not None and process.exit is None and not process.exited.is_set():
            return False
        with self._logs_lock:
            if self._exit_recorded:
                return False
            self._exit_recorded = True
        exit = self.known_exit()
        values = exit_fields(exit, adopted=self.adopted)
        if not self.pid_known and process is not None and process.program_pid is not None:
            self.pid_known, values["pid"] = True, process.program_pid
        if process is not None and process.stopped_with:
            values["stopped_with"] = process.stopped_with
        values.update(self.host.journal_step("exited", exit={
            "returncode": exit.returncode if exit else None,
            "wall_time": values.get("wall_time"), "cpu_time": values.get("cpu_time"),
            "max_rss_kb": values.get("max_rss_kb")}))
        self.emit({**values, **(extra or {})})
        return True

    def _ended(self) -> Outcome:
        """The program has ended: have what it left running outside its group (daemons)
        ended, finish its logs and classify how (either thread)."""
        if not self.adopted or self.lineage.anywhere:
            self.host.engines.reaper.lineages.add(self.lineage)
        stats = self._finish_logs()
        if not self.record_exit(stats) and stats:
            self.emit(stats)  # the exit was written earlier, without them
        return self._outcome()

    def _outcome(self) -> Outcome:
        exit, reason = self.known_exit(), self.limits.stop_reason
        reason = self.limits.leave_cgroup() or reason  # its cgroup's memory.max killed it
        if exit is None and reason is None:
            return Outcome(State.FAILED.value, "exit_status",
                           "the program ended while its core was down and left no exit "
                           "status (its spawner or shim was killed too)")
        if exit is None:  # stopped for a reason; the reason decides the outcome
            exit = Exit(returncode=-signal.SIGTERM, wall_time=0.0, cpu_time=0.0, max_rss_kb=0)
        limits = self.limits
        outcome = classify(exit, reason, timeout=limits.timeout, memory_kb=limits.memory_kb,
                           rss_kb=limits.rss_kb, success_codes=self.program_cls.success_codes)
        return with_stderr(outcome, self.work_dir and self.work_dir / STDERR, self.template.service_id)

    # -- what the limit enforcer does (its thread) ----------------------------------------

    def enforce(self, now: float) -> None:
        """Stop the program if it must stop; send a SIGKILL that became due."""
        process = self.process
        if process is None:
            return
        if process.exited.is_set():
            if self.host.guard.busy:
                self.record_exit()  # the exit came as this thread entered plugin code
            return
        if not self.adopted:
            self.lineage.observe()  # remember escapees, to reap them if they exit first
        if not self.limits.enforce(now, process, self.template.service_id):
            return
        if not self.pid_known and process.usage.find(process.pid) is not None:
            self.pid_known = True  # the shim has forked it: whatever the samples' pace
            self.emit({"pid": process.program_pid})
        process.tick()

    @property
    def settled(self) -> bool:
        """Its program's pid is on the record and its first samples are taken."""
        return self.pid_known and not self.limits.young(time.monotonic())

    def deadline_for(self, name: str, started: float) -> float | None:
        """When a plugin call ``name`` running since ``started`` has overstayed (monotonic)."""
        return self.limits.call_deadline(name, started, self.exited_at)

    def resume(self, stuck: str) -> Outcome:
        """Finish this attempt in a new thread; the old one is stuck in ``stuck``."""
        halt = self.host.halt
        if stuck == COLLECT:
            return stopped_collecting(halt)
        if stuck in PREPARE_STEPS:
            return self._after_watch(halted(halt, stuck, f" ({stuck} did not return; abandoned)"))
        assert self.service is not None
        if stuck in WATCH_CALLBACKS:
            assert self.process is not None
            self.process.exited.wait()  # it has ended, or is being killed (a forced stop)
            if not halt.force:
                self.service.record_callback_error(
                    f"{stuck} did not return within {self.limits.watch_grace():g} s after the "
                    "program ended; abandoned, after_watch_callback ran without waiting for it",
                    "")
            return self._collect(self._after_watch(self._ended()))
        # stuck in after_watch_callback
        text = f"after_watch_callback did not return within {self.limits.after_budget:g} s"
        if halt.force:
            text = "after_watch_callback was abandoned: the core was forced to stop"
        self.service.record_callback_error(text, "")
        outcome = self.outcome or Outcome(State.FAILED.value)
        if outcome.state == State.SUCCEEDED.value:
            return Outcome(State.FAILED.value, "callback", text)
        return outcome

    # -- after_watch_callback and the outputs ---------------------------------------------

    def _after_watch(self, outcome: Outcome) -> Outcome:
        """Run ``after_watch_callback`` once; a success it spoils becomes ``failed``."""
        self.outcome = outcome
        service, handler = self.service, self.handler
        if service is None or handler is None or self.host.halt.force:
            return outcome
        if not self.host.still_current():
            return outcome  # the newer attempt collects; never run the callback twice
        service.outcome = outcome.state

        def after() -> Any:
            files = self._last_look  # (an empty last look is an answer too)
            files = workdir.list_files(service.work_dir) if files is None else files
            return call_callback(service, AFTER, handler.after_watch_callback, service, files)

        sets = service.progress_sets
        failed = not counted(handler, self._last_look) and self.call(AFTER, after) is FAILED
        self.host.mark_collected()
        if failed and outcome.state == State.SUCCEEDED.value:
            return Outcome(State.FAILED.value, "callback",
                           "after_watch_callback raised; see callback_error")
        return settle(outcome, service, handler, progress_sets=sets)

    def _collect(self, outcome: Outcome) -> Outcome:
        """``collect_output_files`` after a success (after ``after_watch_callback``, which
        may still write or rename outputs); a missing output or a failed upload fails."""
        program = self.program
        if outcome.state != State.SUCCEEDED.value or program is None or self.host.halt.force:
            return outcome
        try:
            self.call(COLLECT, program.collect_output_files)
        except Orphaned:
            raise
        except TransferStopped:
            return stopped_collecting(self.host.halt)
        except MissingOutputError as e:
            log.info("service %s: %s", self.template.service_id, e)
            return Outcome(State.FAILED.value, "missing_outputs", str(e),
                           {"failed_in": COLLECT, "missing_outputs": e.missing})
        except BaseException as e:  # a plugin may raise SystemExit too
            return phase_failed(self.template.service_id, PhaseError(COLLECT, e))
        return outcome
