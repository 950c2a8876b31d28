"""ServiceRun: one service from claim to final state, in a thread of its own.

The steps are fixed: create the work dir, ``build()``, ``prepare_input_file()``, spawn
the program, watch it with the handler's callbacks, ``after_watch_callback`` once, and
write the final state (which acknowledges the stream entry). Whatever a plugin raises
ends this service as ``failed`` with the error and traceback; it never reaches the core.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from soaf import shim, workdir
from soaf.config import Settings
from soaf.errors import SoafError
from soaf.journal import RunJournal
from soaf.plugins import Registry
from soaf.procinfo import ProcIdentity
from soaf.runner import Exit, Process, Reaper
from soaf.service import Service
from soaf.state import Change, State
from soaf.template import ServiceParamTemplate
from soaf.watcher import call_callback, watch
from soaf.writer import StateWriter

log = logging.getLogger(__name__)

STDOUT = "stdout.log"
STDERR = "stderr.log"


@dataclass
class Claim:
    """What the intake learned when it claimed a stream entry for this core."""

    entry_id: str
    attempt: int
    seq: int


class Cancelled(Exception):
    """Raised inside a run when a cancel arrives before the program was spawned."""


class ServiceRun:
    """Runs one service; ``start()`` spawns its thread, ``cancel()`` may be called anytime."""

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
    ) -> None:
        self.template = template
        self.claim = claim
        self.registry = registry
        self.settings = settings
        self.writer = writer
        self.reaper = reaper
        self.on_done = on_done
        self.service_id = template.service_id
        self.process: Process | None = None
        self.cancel_requested = threading.Event()
        self.wake = threading.Event()
        self._seq = claim.seq
        self._seq_lock = threading.Lock()
        self._deadline: float | None = None
        self._timeout: float | None = None
        #: The run's journal (soaf.journal), from the moment its work dir exists.
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

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        self.cancel_requested.set()
        self.wake.set()

    # -- recording ----------------------------------------------------------------------

    def emit(self, values: dict[str, Any], *, final: bool = False) -> None:
        with self._seq_lock:
            self._seq += 1
            self.writer.put(
                Change(
                    self.service_id,
                    self.claim.attempt,
                    self._seq,
                    values,
                    ack=self.claim.entry_id if final else None,
                    on_written=self._final_written if final else None,
                )
            )

    def _final_written(self, applied: bool) -> None:
        if self.journal is not None:
            self.journal.remove()
        self.final_written.set()

    def _journal(self, step: str, *, save: bool = False, **info: Any) -> dict[str, Any]:
        if self.journal is None:
            return {}
        return self.journal.try_step(step, **info) if save else self.journal.step(step, **info)

    def _state(self, state: State, **values: Any) -> None:
        self.emit({"state": state.value, f"{state.value}_at": time.time(), **values},
                  final=False)

    # -- the steps ----------------------------------------------------------------------

    def _run(self) -> None:
        final: dict[str, Any]
        try:
            final = self._steps()
        except Cancelled:
            final = {"state": State.CANCELLED.value, "error": "cancelled before it started"}
        except Exception as e:
            phase = getattr(e, "soaf_phase", "core")
            log.warning("service %s failed in %s: %s", self.service_id, phase, e,
                        exc_info=not isinstance(e, SoafError))
            final = {
                "state": State.FAILED.value,
                "error": f"{phase}: {type(e).__name__}: {e}" if phase != "core" else str(e),
                "failed_in": phase,
                "traceback": traceback.format_exc(),
            }
        final.setdefault(f"{final['state']}_at", time.time())
        final["finished_at"] = time.time()
        if self.journal is not None:
            final.update(self.journal.finish(final))
        self.emit(final, final=True)
        log.info("service %s %s", self.service_id, final["state"])
        try:
            self.on_done(self)
        except Exception:
            log.exception("on_done failed for %s", self.service_id)

    def _phase(self, phase: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:
            e.soaf_phase = phase  # type: ignore[attr-defined]
            raise

    def _check_cancel(self) -> None:
        if self.cancel_requested.is_set():
            raise Cancelled()

    def _steps(self) -> dict[str, Any]:
        template = self.template
        program_cls = self.registry.program(template.service)
        handler_cls = self.registry.handler(template.service)
        work_dir = self._phase("work dir", lambda: workdir.create(self.settings.work_root, template))
        self.emit({"work_dir": str(work_dir)})
        self.journal = RunJournal(self.settings.work_root, self.settings.node, self.service_id,
                                  self.claim.attempt, work_dir)
        program = program_cls(template, work_dir, plugin_root=self.settings.plugins)
        timeout = template.timeout if template.timeout is not None else program_cls.timeout

        self._check_cancel()
        self._phase("build", program.build)
        self._check_cancel()
        self._state(State.PREPARING, **self.journal.step("built"))
        self._phase("prepare_input_file", program.prepare_input_file)
        self._check_cancel()
        argv = self._phase("command", program.command)
        env = self._phase("environment", program.environment)
        argv = [str(a) for a in argv] if isinstance(argv, (list, tuple)) else argv
        journal = self.journal
        journal.step("prepared")
        spawn_argv, shimmed = self._phase("start", lambda: shim.wrap(
            argv, cwd=work_dir, env=env, exit_file=journal.exit_file))
        process = Process(
            spawn_argv, cwd=work_dir, env=env, stdout=work_dir / STDOUT, stderr=work_dir / STDERR,
        )
        handler = self._phase("handler", handler_cls)
        service = Service(
            template, work_dir, attempt=self.claim.attempt, node=self.settings.node,
            plugin_version=self.registry.version, emit=self.emit,
        )
        process.on_exit(lambda _exit: self.wake.set())
        self._phase("start", lambda: process.start(self.reaper))
        self.process = process
        if timeout is not None:
            self._timeout = float(timeout)
            self._deadline = time.monotonic() + float(timeout)
        assert process.pid is not None
        identity = ProcIdentity.of(process.pid)
        self._state(State.RUNNING, pid=process.pid, command=list(argv), **self._journal(
            "running", save=True, process=identity.to_dict() if identity else None,
            shimmed=shimmed, running_at=time.time()))
        reason, files = watch(handler, service, process, wake=self.wake, check=self._reason,
                              file_poll=self.settings.file_poll)
        if reason is not None:
            process.stop(self.settings.kill_grace)
        process.exited.wait()
        assert process.exit is not None
        self._exited(process.exit)
        after_error = self._after_watch(handler, service, files)
        return self._final(program_cls.success_codes, process.exit, reason, after_error)

    def _reason(self) -> str | None:
        if self.cancel_requested.is_set():
            return State.CANCELLED.value
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return State.TIMED_OUT.value
        return None

    def _exited(self, exit: Exit) -> None:
        values = {
            "exit_code": exit.exit_code,
            "signal": exit.signal,
            "wall_time": round(exit.wall_time, 6),
            "cpu_time": round(exit.cpu_time, 6),
            "max_rss_kb": exit.max_rss_kb,
            "exited_at": time.time(),
        }
        self.emit({**values, **self._journal("exited", exit={
            "returncode": exit.returncode, "wall_time": values["wall_time"],
            "cpu_time": values["cpu_time"], "max_rss_kb": exit.max_rss_kb})})

    def _after_watch(self, handler: Any, service: Service, files: list[str]) -> str | None:
        if self.superseded or (self.still_current is not None and not self.still_current(self)):
            self.superseded = True  # the newer attempt collects; never run the callback twice
            return None
        before = service.callback_errors
        call_callback(service, "after_watch_callback", handler.after_watch_callback, service, files)
        if self.journal is not None:
            self.journal.collected = True
        if service.callback_errors > before:
            return "after_watch_callback raised; see callback_error"
        return None

    def _final(
        self, success: tuple[int, ...], exit: Exit, reason: str | None, after_error: str | None
    ) -> dict[str, Any]:
        if reason == State.CANCELLED.value:
            return {"state": State.CANCELLED.value, "error": "cancelled while running"}
        if reason == State.TIMED_OUT.value:
            return {"state": State.TIMED_OUT.value,
                    "error": f"ran past its timeout ({self._timeout:g} s)",
                    "failure": "timeout"}
        if exit.signal is not None:
            return {"state": State.FAILED.value, "error": f"killed by {exit.signal}",
                    "failure": "signal"}
        if exit.returncode not in success:
            return {"state": State.FAILED.value, "failure": "exit_code",
                    "error": f"exited with code {exit.returncode}"}
        if after_error is not None:
            return {"state": State.FAILED.value, "failure": "callback", "error": after_error}
        return {"state": State.SUCCEEDED.value}
