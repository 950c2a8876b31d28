"""Re-adopt what a killed core left running on this machine, so a crash of the core costs no
work: its programs keep running, and the restarted core watches them to their end.

A restarted core (same node name) finishes each attempt its predecessor had started, in
the same attempt, when the journal (soaf.journal) says how far it got:

* ``adopt``: the program still runs (verified by pid *and* start time). It is not this
  core's child, so it is watched through a pidfd, and its exit status is read from the
  shim's exit file (soaf.shim) once it ends. The handler is a new instance:
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

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soaf import shim
from soaf.journal import Journal, RunJournal
from soaf.lifecycle import ServiceRun
from soaf.procinfo import ProcIdentity, pidfd_for, stop_group
from soaf.runner import Exit
from soaf.service import Service
from soaf.state import ServiceRecord, State
from soaf.watcher import watch
from soaf.workdir import list_files

log = logging.getLogger(__name__)


class AdoptedProcess:
    """A running program this core did not spawn, watched until it exits."""

    def __init__(self, identity: ProcIdentity, *, exit_file: Path | None,
                 running_at: float | None) -> None:
        self.identity = identity
        self.pid = identity.pid
        self.exit_file = exit_file
        self.running_at = running_at or time.time()
        self.exit: Exit | None = None  # None after the exit: its status is unknown
        self.exited = threading.Event()
        self._on_exit: list[Callable[[Exit | None], None]] = []

    def on_exit(self, callback: Callable[[Exit | None], None]) -> None:
        self._on_exit.append(callback)

    def start(self) -> None:
        threading.Thread(target=self._watch, name=f"soaf-adopted-{self.pid}", daemon=True).start()

    def _watch(self) -> None:
        fd = pidfd_for(self.identity)
        if fd is not None:
            try:
                select.select([fd], [], [])  # a pidfd turns readable when the process exits
            finally:
                os.close(fd)
        # Whatever the leader left in its group goes with it, as for a core's own child.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.identity.pgid, signal.SIGKILL)
        code = shim.read_exit(self.exit_file) if self.exit_file is not None else None
        if code is not None:
            self.exit = Exit(returncode=code, wall_time=time.time() - self.running_at,
                             cpu_time=0.0, max_rss_kb=0)
        self.exited.set()
        for callback in self._on_exit:
            try:
                callback(self.exit)
            except Exception:
                log.exception("on_exit callback failed for adopted pid %d", self.pid)

    def signal_group(self, sig: int) -> bool:
        """Signal the program's group if it is still verifiably the same process."""
        if self.exited.is_set() or not self.identity.alive():
            return False
        try:
            os.killpg(self.identity.pgid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def stop(self, grace: float) -> None:
        if not self.exited.is_set():
            stop_group(self.identity, grace)
        self.exited.wait(grace + 5)


class RecoveredRun(ServiceRun):
    """Finishes, in the same attempt, a run that a killed core of this node started here
    (or, when only its final write was lost, a verifiably dead core of this machine).

    ``identity`` set: adopt the running program. Otherwise collect an ended one, whose
    ``returncode`` (None: unknown) the caller found in the journal or the exit file.
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

    def _steps(self) -> dict[str, Any]:
        template, prev = self.template, self.previous
        self.journal = RunJournal(self.settings.work_root, self.settings.node, self.service_id,
                                  self.claim.attempt, journal=prev)
        now = time.time()
        note: dict[str, Any] = {"node": self.settings.node, "recovered_at": now,
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
        if prev.final is not None:  # after_watch_callback has run: never call it again
            self.journal.collected = True
            return {k: v for k, v in prev.final.items() if k not in ("journal", "finished_at")}
        program_cls = self.registry.program(template.service)
        handler_cls = self.registry.handler(template.service)
        assert prev.work_dir is not None
        work_dir = Path(prev.work_dir)
        handler = self._phase("handler", handler_cls)
        service = Service(template, work_dir, attempt=self.claim.attempt, node=self.settings.node,
                          plugin_version=self.registry.version, emit=self.emit)
        service.restore(self.record.fields, self.record.progress, self.record.message)
        reason: str | None = None
        if self.identity is not None:
            exit, reason, files = self._adopt(handler, service, program_cls, work_dir)
        else:
            exit = (Exit(returncode=self.returncode, wall_time=0.0, cpu_time=0.0, max_rss_kb=0)
                    if self.returncode is not None else None)
            self._exited_recovered(exit)
            files = list_files(work_dir)
        after_error = self._after_watch(handler, service, files)
        if exit is None and reason is None:
            return {"state": State.FAILED.value, "failure": "exit_status",
                    "error": "the program ended while its core was down and left no exit "
                             "status (its shim was killed too)"}
        if exit is None:  # stopped for a reason; the reason decides the outcome
            exit = Exit(returncode=-signal.SIGTERM, wall_time=0.0, cpu_time=0.0, max_rss_kb=0)
        return self._final(program_cls.success_codes, exit, reason, after_error)

    def _adopt(self, handler: Any, service: Service, program_cls: Any,
               work_dir: Path) -> tuple[Exit | None, str | None, list[str]]:
        prev = self.previous
        assert self.identity is not None
        process = AdoptedProcess(
            self.identity, exit_file=Path(prev.exit_file) if prev.shimmed and prev.exit_file
            else None, running_at=prev.running_at)
        process.on_exit(lambda _exit: self.wake.set())
        timeout = (self.template.timeout if self.template.timeout is not None
                   else program_cls.timeout)
        if timeout is not None:
            ran = time.time() - (prev.running_at or time.time())
            self._timeout = float(timeout)
            self._deadline = time.monotonic() + max(0.0, float(timeout) - ran)
        process.start()
        self.process = process  # type: ignore[assignment]
        reason, files = watch(handler, service, process,  # type: ignore[arg-type]
                              wake=self.wake, check=self._reason,
                              file_poll=self.settings.file_poll)
        if reason is not None:
            process.stop(self.settings.kill_grace)
        process.exited.wait()
        self._exited_recovered(process.exit)
        return process.exit, reason, files

    def _exited_recovered(self, exit: Exit | None) -> None:
        values: dict[str, Any] = {"exited_at": time.time(), "cpu_time": None, "max_rss_kb": None,
                                  "exit_status_known": exit is not None}
        if exit is not None:
            values.update(exit_code=exit.exit_code, signal=exit.signal,
                          wall_time=round(exit.wall_time, 6))
        self.emit({**values, **self._journal("exited", exit={
            "returncode": exit.returncode if exit else None,
            "wall_time": values.get("wall_time")})})
