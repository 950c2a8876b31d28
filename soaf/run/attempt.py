"""One attempt of a service: work dir, build, prepare, spawn, watch, after_watch, outcome.

The service's thread runs the attempt, plugin code included, with every plugin call
made through ``call()``, which tells the run what is under way. The core's supervisor
(soaf.core.enforcer) stops the program when it must (``enforce``), and takes the attempt
over in a fresh thread (``resume``) when a plugin call overstays (``deadline_for``).
The program's exit is recorded the moment the reaper sees it (``_exited``), whatever
the plugin code is doing. ``after_watch_callback`` runs exactly once per attempt
(unless the core is forced down), whatever happened before it, and never once a newer
attempt elsewhere has taken the service over (``still_current``). The attempt ends in an
``Outcome`` (soaf.run.outcome).

Data (docs/data.md): the work dir is taken under the work root's shared lock with the
run marker written first, so the sweep (soaf.data.retention) never removes it under the
attempt; ``prepare_input_file`` stages the inputs; after ``after_watch_callback``, and
only when the attempt has succeeded so far, ``collect_output_files`` checks, records and
uploads the outputs (a missing one fails the attempt: ``failure: missing_outputs``).

Its steps (built, prepared, running with the program's identity, exited, collected) go
to the run's journal (soaf.run.journal), and the program runs under the shim (soaf.process.shim),
which leaves its exit status in a file: a core restarted after a crash finishes the
attempt from there (soaf.run.recovered) instead of running it again.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soaf.core.logkeeper import LogHandle
from soaf.data import markers, workdir
from soaf.data.staging import StageContext
from soaf.errors import MissingOutputError, ProgramError, SoafError, ValidationError
from soaf.plugin.service import Service
from soaf.process import shim
from soaf.process.identity import ProcIdentity
from soaf.process.spawn import Exit, Process
from soaf.protocol.state import State
from soaf.run.callbacks import FAILED, call_callback, watch
from soaf.run.outcome import INTERRUPTED, Outcome, classify

if TYPE_CHECKING:
    from soaf.run.service_run import ServiceRun

log = logging.getLogger(__name__)

STDOUT = "stdout.log"
STDERR = "stderr.log"

#: Seconds between two looks at the resident memory of a program that has a limit.
MEMORY_CHECK_INTERVAL = 0.5
#: Plugin calls made before the program starts.
PREPARE_STEPS = ("handler", "program", "build", "prepare_input_file", "command",
                 "environment", "working_dir")
WATCH_CALLBACKS = ("before_watch_callback", "file_change_callback")
AFTER = "after_watch_callback"
#: The last plugin call of a successful attempt (it may upload: no callback budget).
COLLECT = "collect_output_files"


class Halted(Exception):
    """A cancel or a core stop arrived before the program started."""


class Orphaned(BaseException):
    """This thread's plugin call returned after the supervisor gave the attempt to another
    thread: the thread must end without touching the service again."""


class PhaseError(Exception):
    """Plugin code raised in a phase; carries the phase and the traceback."""

    def __init__(self, phase: str, error: BaseException) -> None:
        super().__init__(str(error))
        self.phase = phase
        self.error = error


class Attempt:
    """Attempt number ``number`` of ``run``'s service; ``run()`` returns its Outcome."""

    def __init__(self, run: ServiceRun, number: int) -> None:
        self.run_ = run
        self.number = number
        self.template = run.template
        self.settings = run.settings
        self.program_cls = run.program_cls
        self.started_at = time.time()
        self.work_dir: Path | None = None
        self.handler: Any = None
        self.program: Any = None
        self.step = ""  # the last plugin call made
        self.service: Service | None = None
        self.process: Process | None = None
        self.argv: list[str] | None = None  # the command as the plugin gave it (no shim)
        self.exited_at: float | None = None  # monotonic
        self.stop_reason: str | None = None
        self.outcome: Outcome | None = None  # as known before after_watch_callback
        self._logs: LogHandle | None = None
        self._logs_lock = threading.Lock()
        self._exit_recorded = False
        self._started = threading.Lock()
        self._deadline: float | None = None
        self._timeout: float | None = None
        self._memory_kb: int | None = None
        self._next_memory_check = 0.0
        self._rss_kb = 0
        self.shimmed = False

    def emit(self, values: dict[str, Any]) -> None:
        self.run_.emit(values, attempt=self.number)

    def call(self, name: str, fn: Any, *args: Any) -> Any:
        """Run plugin code in this thread, letting the supervisor know it is under way."""
        run = self.run_
        self.step = name
        with run.lock:
            generation = run.generation
            run.in_call = (name, time.monotonic(), self)
        orphaned = False
        try:
            return fn(*args)
        finally:
            with run.lock:
                if run.generation != generation:
                    orphaned = True
                else:
                    run.in_call = None
            if orphaned:
                raise Orphaned(name)

    # -- the attempt, in the service's thread --------------------------------------------

    def run(self) -> Outcome:
        try:
            self.work_dir = self._work_dir()
        except Exception as e:
            return Outcome(State.FAILED.value, "plugin", f"work dir: {e}", {"failed_in": "work dir"})
        self.emit({"work_dir": str(self.work_dir), "host": socket.gethostname()})
        journal = self.run_.new_journal(self.number, self.work_dir)
        self.service = Service(
            self.template, self.work_dir, attempt=self.number, node=self.settings.node,
            plugin_version=self.run_.registry.version, emit=self.emit,
        )
        outcome: Outcome | None = None
        try:
            argv, env, cwd = self._prepare()
        except Halted:
            outcome = self._halted()
        except PhaseError as e:
            outcome = self._phase_failed(e)
        if outcome is None:
            argv = [str(a) for a in argv] if isinstance(argv, (list, tuple)) else argv
            self.argv = list(argv) if isinstance(argv, list) else None
            journal.step("prepared")
            # The shim records the exit status in a file, for a core that restarts meanwhile.
            try:
                spawn_argv, self.shimmed = shim.wrap(argv, cwd=Path(cwd), env=env,
                                                     exit_file=journal.exit_file)
            except ProgramError:  # it cannot start: the spawn below says why, in its words
                spawn_argv, self.shimmed = argv, False
            process = Process(
                spawn_argv,  # type: ignore[arg-type]
                cwd=Path(cwd), env=env, stdout=self.work_dir / STDOUT,
                stderr=self.work_dir / STDERR,
            )
            outcome = self._supervise(process)
            if outcome.state == State.SUCCEEDED.value:
                escape = self._outputs_escape()
                if escape is not None:
                    outcome = Outcome(State.FAILED.value, "confinement", escape)
        return self._collect(self._after_watch(outcome))

    def _outputs_escape(self) -> str | None:
        """Why the output names now lead out of the work dir (the program may have made
        links), or None when they stay inside."""
        assert self.work_dir is not None
        try:
            workdir.check_names(self.settings.work_root, self.work_dir, self.template,
                                outputs_only=True)
        except ValidationError as e:
            log.warning("service %s: %s", self.template.service_id, e)
            return f"after the run: {e}"
        return None

    def _prepare(self) -> tuple[Any, Any, Any]:
        """Handler, program, build, prepare_input_file, command: (argv, env, cwd)."""
        step = "handler"
        try:
            self.handler = self.call(step, self.run_.handler_cls)
            step = "program"
            program = self.call(step, lambda: self.program_cls(
                self.template, self.work_dir, attempt=self.number,
                plugin_root=self.settings.plugins))
            self.program = program
            program.service = self.service
            program.staging = StageContext(timeout=self.settings.fetch_timeout,
                                           resolve=self.run_.resolve)
            step = "build"
            self.call(step, program.build)
            step = "work dir check"  # build() may have made links that lead out
            self.call(step, lambda: workdir.check_names(
                self.settings.work_root, self.work_dir, self.template))
            self._halt_check()
            self.emit({"state": State.PREPARING.value, "preparing_at": time.time(),
                       **self.run_.journal_step("built")})
            step = "prepare_input_file"
            self.call(step, program.prepare_input_file)
            self._halt_check()
            step = "command"
            argv = self.call(step, program.command)
            step = "environment"
            env = self.call(step, program.environment)
            step = "working_dir"
            cwd = self.call(step, program.working_dir)
        except (Halted, Orphaned):
            raise
        except BaseException as e:  # a plugin may raise SystemExit too
            raise PhaseError(step, e) from e
        self._halt_check()
        return argv, env, cwd

    def _halt_check(self) -> None:
        if self.run_.halted:
            raise Halted()

    def _halted(self, note: str = "") -> Outcome:
        phase = self.step
        where = {"build": " while building", "prepare_input_file": " while preparing its input",
                 }.get(phase, "")
        if self.run_.interrupt_requested:
            return Outcome(INTERRUPTED, error=f"core stopped{where}, before it started{note}")
        return Outcome(State.CANCELLED.value, error=f"cancelled{where}, before it started{note}")

    def _phase_failed(self, e: PhaseError) -> Outcome:
        err = e.error
        log.warning("service %s failed in %s: %s", self.template.service_id, e.phase, err,
                    exc_info=(type(err), err, err.__traceback__)
                    if not isinstance(err, SoafError) else None)
        failure = "start" if isinstance(err, ProgramError) else "plugin"
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        return Outcome(State.FAILED.value, failure, f"{e.phase}: {type(err).__name__}: {err}",
                       {"failed_in": e.phase, "traceback": tb})

    def _work_dir(self) -> Path:
        root = self.settings.work_root
        policy = self.program_cls.work_dir_policy
        if policy not in ("fresh", "reuse"):
            raise SoafError(f"work_dir_policy must be 'fresh' or 'reuse', got {policy!r}")
        if policy == "fresh" and self.number > 1 and not self.template.work_path:
            path = workdir.work_dir_for(root, self.template)
            moved = workdir.set_aside(path, f"attempt{self.number - 1}")
            if moved is not None:
                last = self.run_.attempts[-1].get("state") if self.run_.attempts else None
                markers.mark_set_aside(root, moved.relative_to(root).as_posix(),
                                       last or State.FAILED.value)
                log.info("service %s: attempt %d runs in a fresh dir; the last one is at %s",
                         self.template.service_id, self.number, moved)
        # Marker first, under the shared lock: a sweep sees the dir as in use from the
        # moment it exists.
        with markers.work_root_lock(root, exclusive=False):
            name = self.template.work_path or self.template.service_id
            self.run_.marker = markers.mark_started(root, self.template.service_id, name)
            return workdir.create(root, self.template)

    # -- the program --------------------------------------------------------------------

    def _supervise(self, process: Process) -> Outcome:
        run = self.run_
        timeout = self.template.timeout if self.template.timeout is not None else \
            self.program_cls.timeout
        memory = getattr(self.template, "max_memory_mb", None) or self.program_cls.max_memory_mb
        self._memory_kb = int(float(memory) * 1024) if memory else None
        process.on_exit(self._exited)
        with self._started:  # the exit is recorded after "running", however fast it comes
            try:
                process.start(run.reaper)
            except ProgramError as e:
                return Outcome(State.FAILED.value, "start", str(e), {"failed_in": "start"})
            if timeout is not None:
                self._timeout = float(timeout)
                self._deadline = time.monotonic() + float(timeout)
            if run.keeper is not None:
                self._logs = run.keeper.add(self.template.service_id, self.number, {
                    "stdout": process.stdout_path, "stderr": process.stderr_path})
            self.process = process  # from here on the supervisor enforces the limits
            assert process.pid is not None
            identity = ProcIdentity.of(process.pid)
            now = time.time()
            self.emit({"state": State.RUNNING.value, "running_at": now, "pid": process.pid,
                       "command": self.argv if self.argv is not None else list(process.argv),
                       **run.journal_step(
                           "running", save=True, shimmed=self.shimmed, running_at=now,
                           process=identity.to_dict() if identity else None)})
        assert self.service is not None
        watch(self.handler, self.service, process, self.call, wake=run.wake,
              file_poll=self.settings.file_poll)
        process.exited.wait()
        return self._ended()

    def _exited(self, exit: Exit) -> None:
        """The reaper saw the program end (reaper thread). If this attempt's thread is in
        plugin code, record the exit now; else that thread does, in a moment, sparing
        a hand-over between threads."""
        with self._started:
            pass
        self.exited_at = time.monotonic()
        if self.service is not None:
            self.service.exit = exit
        with self.run_.lock:
            busy = self.run_.in_call is not None
        if busy:
            self.record_exit()
        self.run_.wake.set()

    def record_exit(self, extra: dict[str, Any] | None = None) -> bool:
        """Write how the program ended, once (whichever thread comes first); False if it
        was written already."""
        process = self.process
        if process is None or process.exit is None:
            return False
        with self._logs_lock:
            if self._exit_recorded:
                return False
            self._exit_recorded = True
        exit = process.exit
        values: dict[str, Any] = {
            "exit_code": exit.exit_code,
            "signal": exit.signal,
            "wall_time": round(exit.wall_time, 6),
            "cpu_time": round(exit.cpu_time, 6),
            "max_rss_kb": exit.max_rss_kb,
            "exited_at": time.time(),
        }
        if process.stopped_with:
            values["stopped_with"] = process.stopped_with
        values.update(self.run_.journal_step("exited", exit={
            "returncode": exit.returncode, "wall_time": values["wall_time"],
            "cpu_time": values["cpu_time"], "max_rss_kb": exit.max_rss_kb}))
        self.emit({**values, **(extra or {})})
        return True

    def _ended(self) -> Outcome:
        """The program has ended: finish its logs and classify how (either thread)."""
        with self._logs_lock:
            logs, self._logs = self._logs, None
        stats: dict[str, Any] = {}
        if logs is not None:
            stats = self.run_.keeper.finish(logs)  # type: ignore[union-attr]
        if not self.record_exit(stats) and stats:
            self.emit(stats)  # the exit was written earlier, without them
        assert self.process is not None and self.process.exit is not None
        return self._classify(self.process.exit, self.stop_reason)

    # -- what the supervisor does (its thread) ------------------------------------------

    def enforce(self, now: float) -> None:
        """Stop the program if it must stop; send a SIGKILL that became due."""
        process = self.process
        if process is None:
            return
        if process.exited.is_set():
            if self.run_.in_call is not None:
                self.record_exit()  # the exit came as this thread entered plugin code
            return
        run = self.run_
        if run.force:
            self.stop_reason = self.stop_reason or INTERRUPTED
            process.begin_stop(0)
            return
        if self.stop_reason is None:
            reason = self._reason(now, process)
            if reason is not None:
                self.stop_reason = reason
                log.info("stopping service %s (%s)", self.template.service_id, reason)
                process.begin_stop(0 if reason == "memory" else self.settings.kill_grace)
        process.tick()

    def _reason(self, now: float, process: Process) -> str | None:
        run = self.run_
        if run.interrupt_requested:
            return INTERRUPTED
        if run.cancel_requested:
            return State.CANCELLED.value
        if self._deadline is not None and now >= self._deadline:
            return State.TIMED_OUT.value
        if self._memory_kb is not None and now >= self._next_memory_check:
            self._next_memory_check = now + MEMORY_CHECK_INTERVAL
            self._rss_kb = process.rss_kb()
            if self._rss_kb > self._memory_kb:
                return "memory"
        return None

    def deadline_for(self, name: str, started: float) -> float | None:
        """When a plugin call ``name`` running since ``started`` has overstayed (monotonic)."""
        run = self.run_
        if run.force:
            return started
        if name in PREPARE_STEPS or name == COLLECT:
            return None if run.halt_at is None else run.halt_at + self.settings.kill_grace
        if name in WATCH_CALLBACKS:
            if self.exited_at is None:
                return None  # the program runs; a slow callback only delays the next one
            return self.exited_at + self._watch_grace()
        return started + self._budget()  # after_watch_callback

    def _watch_grace(self) -> float:
        """How long a callback may go on after the program ended."""
        if self.stop_reason in (State.CANCELLED.value, INTERRUPTED):
            return self.settings.kill_grace
        return self._budget()

    def _budget(self) -> float:
        own = getattr(self.handler, "after_watch_timeout", None)
        return float(own) if own else self.settings.callback_timeout

    def resume(self, stuck: str) -> Outcome:
        """Finish this attempt in a new thread; the old one is stuck in ``stuck``."""
        if stuck == COLLECT:
            if self.run_.interrupt_requested:
                return Outcome(INTERRUPTED, error="core stopped while the outputs were collected")
            return Outcome(State.CANCELLED.value,
                           error="cancelled while the outputs were collected")
        if stuck in PREPARE_STEPS:
            return self._after_watch(self._halted(f" ({stuck} did not return; abandoned)"))
        assert self.service is not None
        if stuck in WATCH_CALLBACKS:
            assert self.process is not None
            self.process.exited.wait()  # it has ended, or is being killed (a forced stop)
            if not self.run_.force:
                self.service.record_callback_error(
                    f"{stuck} did not return within {self._watch_grace():g} s after the "
                    "program ended; abandoned, after_watch_callback ran without waiting for it",
                    "")
            return self._collect(self._after_watch(self._ended()))
        # stuck in after_watch_callback
        text = f"after_watch_callback did not return within {self._budget():g} s"
        if self.run_.force:
            text = "after_watch_callback was abandoned: the core was forced to stop"
        self.service.record_callback_error(text, "")
        outcome = self.outcome or Outcome(State.FAILED.value)
        if outcome.state == State.SUCCEEDED.value:
            return Outcome(State.FAILED.value, "callback", text)
        return outcome

    # -- classification and after_watch_callback ----------------------------------------

    def _classify(self, exit: Exit, reason: str | None) -> Outcome:
        return classify(exit, reason, timeout=self._timeout, memory_kb=self._memory_kb,
                        rss_kb=self._rss_kb, success_codes=self.program_cls.success_codes)

    def _after_watch(self, outcome: Outcome) -> Outcome:
        """Run ``after_watch_callback`` once; a success it spoils becomes ``failed``."""
        self.outcome = outcome
        service, handler = self.service, self.handler
        run = self.run_
        if service is None or handler is None or run.force:
            return outcome
        if run.superseded or (run.still_current is not None and not run.still_current(run)):
            run.superseded = True  # the newer attempt collects; never run the callback twice
            return outcome
        service.outcome = outcome.state

        def after() -> Any:
            files = workdir.list_files(service.work_dir)
            return call_callback(service, AFTER, handler.after_watch_callback, service, files)

        failed = self.call(AFTER, after) is FAILED
        if run.journal is not None:
            run.journal.collected = True
        if failed and outcome.state == State.SUCCEEDED.value:
            return Outcome(State.FAILED.value, "callback",
                           "after_watch_callback raised; see callback_error")
        return outcome

    def _collect(self, outcome: Outcome) -> Outcome:
        """``collect_output_files`` after a success (after ``after_watch_callback``, which
        may still write or rename outputs); a missing output or a failed upload fails."""
        program = self.program
        if outcome.state != State.SUCCEEDED.value or program is None or self.run_.force:
            return outcome
        try:
            self.call(COLLECT, program.collect_output_files)
        except Orphaned:
            raise
        except MissingOutputError as e:
            log.info("service %s: %s", self.template.service_id, e)
            return Outcome(State.FAILED.value, "missing_outputs", str(e),
                           {"failed_in": COLLECT, "missing_outputs": e.missing})
        except BaseException as e:  # a plugin may raise SystemExit too
            return self._phase_failed(PhaseError(COLLECT, e))
        return outcome
