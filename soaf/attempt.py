"""One attempt of a service: work dir, build, prepare, spawn, watch, after_watch, outcome.

The service's thread runs the attempt and only ever waits; plugin code (build,
prepare_input_file, command, the handler's callbacks) runs in the attempt's
``PluginThread`` under a time budget, so a plugin that hangs cannot keep a cancel, a
timeout or the program's exit from being acted on and recorded. ``after_watch_callback``
runs exactly once per attempt (unless the core is forced down), whatever happened
before it. The attempt ends in an ``Outcome`` with a failure kind a user can tell apart
at a glance (``FAILURES``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soaf import workdir
from soaf.callbacks import PluginThread
from soaf.errors import ProgramError, SoafError
from soaf.logs import LogHandle
from soaf.runner import Exit, Process
from soaf.service import Service
from soaf.state import State
from soaf.watcher import FAILED, call_callback, watch

if TYPE_CHECKING:
    from soaf.lifecycle import ServiceRun

log = logging.getLogger(__name__)

STDOUT = "stdout.log"
STDERR = "stderr.log"

#: The ``failure`` field of a failed or timed-out service: what went wrong, in one word.
FAILURES = {
    "exit_code": "the program exited with a code that is not a success code",
    "signal": "the program was killed by a signal",
    "timeout": "the program ran past its timeout and was stopped",
    "memory": "the program used more memory than its limit and was killed",
    "start": "the program could not be started (missing executable, permission, cwd)",
    "plugin": "plugin code (build, prepare_input_file, command ...) raised",
    "callback": "after_watch_callback raised or did not return in time",
}
#: Fraction of a memory limit that a SIGKILLed program must have reached for its death
#: to be classified ``memory`` (the kernel's OOM killer, or a cgroup limit, killed it).
MEMORY_NEAR = 0.9
#: Seconds between two looks at the resident memory of a program that has a limit.
MEMORY_CHECK_INTERVAL = 0.5
#: Not a final state: the core was stopped and stopped the program; the service is left
#: for recovery.
INTERRUPTED = "interrupted"


class Halted(Exception):
    """A cancel or a core stop arrived while plugin code ran before the program started."""


class PhaseError(Exception):
    """Plugin code raised in a phase; carries the phase and the traceback."""

    def __init__(self, phase: str, error: BaseException, tb: str | None) -> None:
        super().__init__(str(error))
        self.phase = phase
        self.error = error
        self.tb = tb


@dataclass
class Outcome:
    """How one attempt ended."""

    state: str
    failure: str | None = None
    error: str | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, **self.values}
        if self.failure is not None:
            out["failure"] = self.failure
        if self.error is not None:
            out["error"] = self.error
        return out


class Attempt:
    """Runs attempt number ``number`` of ``run``'s service; ``run()`` returns its Outcome."""

    def __init__(self, run: ServiceRun, number: int) -> None:
        self.run_ = run
        self.number = number
        self.template = run.template
        self.settings = run.settings
        self.program_cls = run.program_cls
        self.handler_cls = run.handler_cls
        self.plugin = PluginThread(f"soaf-svc-{self.template.service_id[:12]}")
        self.process: Process | None = None
        self.started_at = time.time()
        self.work_dir: Path | None = None
        self._deadline: float | None = None
        self._timeout: float | None = None
        self._memory_kb: int | None = None
        self._next_memory_check = 0.0
        self._rss_kb = 0

    def emit(self, values: dict[str, Any]) -> None:
        self.run_.emit(values, attempt=self.number)

    # -- plugin code under supervision --------------------------------------------------

    def _step(self, phase: str, fn: Any, *args: Any) -> Any:
        call = self.plugin.submit(phase, fn, *args)
        if not call.wait(until=self.run_.halt):
            raise Halted(phase)
        if call.error is not None:
            raise PhaseError(phase, call.error, call.traceback)
        return call.result

    # -- the attempt --------------------------------------------------------------------

    def run(self) -> Outcome:
        try:
            return self._run()
        finally:
            self.plugin.close()

    def _run(self) -> Outcome:
        template = self.template
        try:
            self.work_dir = self._work_dir()
        except Exception as e:
            return Outcome(State.FAILED.value, "plugin", f"work dir: {e}", {"failed_in": "work dir"})
        self.emit({"work_dir": str(self.work_dir)})
        service = Service(
            template, self.work_dir, attempt=self.number, node=self.settings.node,
            plugin_version=self.run_.registry.version, emit=self.emit,
        )
        handler = None
        outcome: Outcome | None = None
        try:
            handler = self._step("handler", self.handler_cls)
            program = self._step("program", lambda: self.program_cls(
                template, self.work_dir, attempt=self.number,
                plugin_root=self.settings.plugins))
            self._step("build", program.build)
            self._halt_check("build")
            self.emit({"state": State.PREPARING.value, "preparing_at": time.time()})
            self._step("prepare_input_file", program.prepare_input_file)
            self._halt_check("prepare_input_file")
            argv = self._step("command", program.command)
            env = self._step("environment", program.environment)
            cwd = self._step("working_dir", program.working_dir)
            self._halt_check("start")
        except Halted as h:
            outcome = self._halted(str(h))
        except PhaseError as e:
            outcome = self._phase_failed(e)
        if outcome is None:
            process = Process(
                [str(a) for a in argv] if isinstance(argv, (list, tuple)) else argv,
                cwd=Path(cwd), env=env, stdout=self.work_dir / STDOUT,
                stderr=self.work_dir / STDERR,
            )
            outcome = self._supervise(process, handler, service)
        service.outcome = outcome.state
        if handler is not None and not self.run_.force.is_set():
            callback_error = self._after_watch(handler, service, outcome)
            if callback_error is not None and outcome.state == State.SUCCEEDED.value:
                outcome = Outcome(State.FAILED.value, "callback", callback_error)
        return outcome

    def _work_dir(self) -> Path:
        root = self.settings.work_root
        path = workdir.work_dir_for(root, self.template)
        policy = self.program_cls.work_dir_policy
        if policy not in ("fresh", "reuse"):
            raise SoafError(f"work_dir_policy must be 'fresh' or 'reuse', got {policy!r}")
        if policy == "fresh" and self.number > 1 and not self.template.work_path:
            moved = workdir.set_aside(path, f"attempt{self.number - 1}")
            if moved is not None:
                log.info("service %s: attempt %d runs in a fresh dir; the last one is at %s",
                         self.template.service_id, self.number, moved)
        return workdir.create(root, self.template)

    def _halt_check(self, phase: str) -> None:
        if self.run_.halt.is_set():
            raise Halted(phase)

    def _halted(self, phase: str) -> Outcome:
        where = {"build": " while building", "prepare_input_file": " while preparing its input",
                 }.get(phase, "")
        # Let the plugin code in flight finish briefly; a hung build is abandoned.
        current = self.plugin.current
        note = ""
        if current is not None and not current.wait(self.settings.kill_grace,
                                                     until=self.run_.force):
            note = f" ({current.name} did not return; abandoned)"
            self.plugin.abandon()
        if self.run_.interrupt_requested.is_set():
            return Outcome(INTERRUPTED, error=f"core stopped{where}, before it started{note}")
        return Outcome(State.CANCELLED.value, error=f"cancelled{where}, before it started{note}")

    def _phase_failed(self, e: PhaseError) -> Outcome:
        err = e.error
        log.warning("service %s failed in %s: %s", self.template.service_id, e.phase, err,
                    exc_info=(type(err), err, err.__traceback__)
                    if not isinstance(err, SoafError) else None)
        failure = "start" if isinstance(err, ProgramError) else "plugin"
        return Outcome(State.FAILED.value, failure, f"{e.phase}: {type(err).__name__}: {err}",
                       {"failed_in": e.phase, "traceback": e.tb})

    # -- the program --------------------------------------------------------------------

    def _supervise(self, process: Process, handler: Any, service: Service) -> Outcome:
        run = self.run_
        timeout = self.template.timeout if self.template.timeout is not None else \
            self.program_cls.timeout
        memory = getattr(self.template, "max_memory_mb", None) or self.program_cls.max_memory_mb
        self._memory_kb = int(float(memory) * 1024) if memory else None
        process.on_exit(lambda _exit: run.wake.set())
        try:
            process.start(run.reaper)
        except ProgramError as e:
            return Outcome(State.FAILED.value, "start", str(e), {"failed_in": "start"})
        logs: LogHandle | None = None
        try:
            self.process = process
            if timeout is not None:
                self._timeout = float(timeout)
                self._deadline = time.monotonic() + float(timeout)
            logs = run.keeper.add(self.template.service_id, self.number, {
                "stdout": process.stdout_path, "stderr": process.stderr_path,
            }) if run.keeper is not None else None
            self.emit({"state": State.RUNNING.value, "running_at": time.time(),
                       "pid": process.pid, "command": list(process.argv)})
            reason = watch(handler, service, process, self.plugin, wake=run.wake,
                           check=self._reason, due=self._due, file_poll=self.settings.file_poll)
            stopped_with = self._stop(process, reason)
            process.exited.wait()
            assert process.exit is not None
            service.exit = process.exit
            values = self._exit_values(process.exit)
            if stopped_with:
                values["stopped_with"] = stopped_with
            if logs is not None:
                values.update(run.keeper.finish(logs))  # type: ignore[union-attr]
                logs = None
            self.emit(values)
            return self._classify(process.exit, reason)
        finally:
            if logs is not None:
                run.keeper.finish(logs)  # type: ignore[union-attr]

    def _reason(self) -> str | None:
        run = self.run_
        if run.interrupt_requested.is_set():
            return INTERRUPTED
        if run.cancel_requested.is_set():
            return State.CANCELLED.value
        now = time.monotonic()
        if self._deadline is not None and now >= self._deadline:
            return State.TIMED_OUT.value
        if self._memory_kb is not None and now >= self._next_memory_check:
            self._next_memory_check = now + MEMORY_CHECK_INTERVAL
            assert self.process is not None
            self._rss_kb = self.process.rss_kb()
            if self._rss_kb > self._memory_kb:
                return "memory"
        return None

    def _due(self) -> float | None:
        times = [t for t in (self._deadline,
                             self._next_memory_check if self._memory_kb else None)
                 if t is not None]
        return min(times) if times else None

    def _stop(self, process: Process, reason: str | None) -> str | None:
        """Stop the program for ``reason``; returns the last signal it needed."""
        if reason is None:
            return None
        if reason == "memory" or self.run_.force.is_set():
            process.kill()
            return "SIGKILL"
        log.info("stopping service %s (%s)", self.template.service_id, reason)
        return process.stop(self.settings.kill_grace, force=self.run_.force)

    @staticmethod
    def _exit_values(exit: Exit) -> dict[str, Any]:
        return {
            "exit_code": exit.exit_code,
            "signal": exit.signal,
            "wall_time": round(exit.wall_time, 6),
            "cpu_time": round(exit.cpu_time, 6),
            "max_rss_kb": exit.max_rss_kb,
            "exited_at": time.time(),
        }

    def _classify(self, exit: Exit, reason: str | None) -> Outcome:
        if reason == INTERRUPTED:
            return Outcome(INTERRUPTED, error="core stopped while it ran")
        if reason == State.CANCELLED.value:
            return Outcome(State.CANCELLED.value, error="cancelled while running")
        if reason == State.TIMED_OUT.value:
            how = " (SIGKILL after the grace period)" if exit.signal == "SIGKILL" else ""
            return Outcome(State.TIMED_OUT.value, "timeout",
                           f"ran past its timeout ({self._timeout:g} s){how}")
        limit_kb = self._memory_kb
        if reason == "memory" or (
            limit_kb and exit.signal == "SIGKILL" and exit.max_rss_kb >= MEMORY_NEAR * limit_kb
        ):
            used = max(self._rss_kb, exit.max_rss_kb)
            return Outcome(State.FAILED.value, "memory",
                           f"used {used / 1024:.0f} MiB, over its memory limit of "
                           f"{(limit_kb or 0) / 1024:g} MiB; killed")
        if exit.signal is not None:
            return Outcome(State.FAILED.value, "signal", f"killed by {exit.signal}")
        if exit.returncode not in self.program_cls.success_codes:
            return Outcome(State.FAILED.value, "exit_code", f"exited with code {exit.returncode}")
        return Outcome(State.SUCCEEDED.value)

    # -- after_watch_callback -----------------------------------------------------------

    def _after_watch(self, handler: Any, service: Service, outcome: Outcome) -> str | None:
        """Run ``after_watch_callback`` once; the error text if it raised or overran."""
        budget = handler.after_watch_timeout or self.settings.callback_timeout
        current = self.plugin.current
        if current is not None and not current.done.is_set():
            # A callback still running: it may finish, but not forever.
            wait = self.settings.kill_grace if outcome.state in (
                State.CANCELLED.value, INTERRUPTED) else budget
            if not current.wait(wait, until=self.run_.force):
                text = (f"{current.name} did not return within {wait:g} s; "
                        "abandoned, after_watch_callback ran without waiting for it")
                service.record_callback_error(text, "")
                self.plugin.abandon()
        if self.run_.force.is_set():
            return None

        def after() -> Any:
            files = workdir.list_files(service.work_dir)
            return call_callback(service, "after_watch_callback", handler.after_watch_callback,
                                 service, files)

        call = self.plugin.submit("after_watch_callback", after)
        if not call.wait(budget, until=self.run_.force):
            self.plugin.abandon()
            text = f"after_watch_callback did not return within {budget:g} s"
            service.record_callback_error(text, "")
            return text
        if call.result is FAILED:
            return "after_watch_callback raised; see callback_error"
        return None
