"""Outcome: how one attempt of a service ended, and the classification of a program's end.

The ``failure`` field tells failures apart at a glance (``FAILURES``); ``classify`` turns
a program's exit, and why soaf stopped it if it did, into an Outcome.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaf.plugin.service import Service
from soaf.process.spawn import Exit
from soaf.protocol.state import State

#: The ``failure`` field of a failed or timed-out service: what went wrong, in one word.
FAILURES = {
    "exit_code": "the program exited with a code that is not a success code",
    "signal": "the program was killed by a signal",
    "timeout": "the program ran past its timeout and was stopped",
    "memory": "the program used more memory than its limit and was killed",
    "start": "the program could not be started (missing executable, permission, cwd)",
    "plugin": "plugin code (build, prepare_input_file, command ...) raised",
    "callback": "after_watch_callback raised or did not return in time, or a callback "
                "raised and the handler sets fail_on_callback_error",
    "missing_outputs": "the program succeeded but did not write every ``output_files`` entry",
    "exit_status": "the program ended while no core watched it, and left no exit status",
    "lost": "the attempt was lost with its core and no retries were left",
}
#: Fraction of a memory limit that a SIGKILLed program must have reached for its death
#: to be classified ``memory`` (the kernel's OOM killer, or a cgroup limit, killed it).
MEMORY_NEAR = 0.9
#: Not a final state: the core was stopped; the service is left for recovery.
INTERRUPTED = "interrupted"
#: The error of a failed or timed-out program ends with at most this many of the last
#: lines of its stderr, and at most ``STDERR_TAIL_BYTES`` of them.
STDERR_TAIL_LINES = 5
STDERR_TAIL_BYTES = 1024


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


def stderr_tail(path: Path) -> str:
    """The last lines of a program's stderr file (a line redrawn with ``\r`` counts as
    what it shows last), bounded by ``STDERR_TAIL_LINES`` and ``STDERR_TAIL_BYTES``; ""
    when there is none."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - 4 * STDERR_TAIL_BYTES))
            data = f.read()
    except OSError:
        return ""
    lines = [line.rsplit(b"\r", 1)[-1].rstrip() for line in data.split(b"\n")]
    lines = [line for line in lines if line][-STDERR_TAIL_LINES:]
    text = b"\n".join(lines)[-STDERR_TAIL_BYTES:]
    return text.decode("utf-8", errors="replace")


def with_stderr(outcome: Outcome, stderr: Path | None, service_id: str) -> Outcome:
    """``outcome`` with the program's last stderr lines (from the file ``stderr``) at the
    end of its error, and where to read all of it, when it failed or timed out."""
    if stderr is None or not outcome.error or outcome.state not in (State.FAILED.value,
                                                                    State.TIMED_OUT.value):
        return outcome  # (the file is read only when its tail is shown)
    tail = stderr_tail(stderr)
    if tail:
        outcome.error = (f"{outcome.error} (see soaf logs {service_id} --stderr); "
                         f"last lines of stderr:\n{tail}")
    return outcome


def settle(outcome: Outcome, service: Service, handler: Any, *, progress_sets: int) -> Outcome:
    """The outcome once ``after_watch_callback`` has run: a success fails if callbacks
    raised and the handler sets ``fail_on_callback_error``; else a success whose handler
    did not set progress in ``after_watch_callback`` (``service.progress_sets`` is still
    ``progress_sets``) gets progress 1.0 on its record."""
    if outcome.state != State.SUCCEEDED.value:
        return outcome
    if service.callback_errors and getattr(handler, "fail_on_callback_error", False):
        n = service.callback_errors
        return Outcome(State.FAILED.value, "callback",
                       f"{n} callback error{'s' if n > 1 else ''} (the handler sets "
                       f"fail_on_callback_error), the last: {service.last_callback_error}")
    if service.progress_sets == progress_sets and service.progress != 1.0:
        outcome.values["progress"] = 1.0
    return outcome


def exit_fields(exit: Exit | None, *, adopted: bool) -> dict[str, Any]:
    """The record's fields for a program's end; ``adopted``: this core is not its parent,
    so its CPU time and peak memory are unknown unless its exit file told them."""
    values: dict[str, Any] = {"exited_at": time.time()}
    if adopted:
        values.update(cpu_time=None, max_rss_kb=None, exit_status_known=exit is not None)
    if exit is not None:
        values.update(exit_code=exit.exit_code, signal=exit.signal,
                      wall_time=round(exit.wall_time, 6))
        if not adopted or exit.usage_known:
            values.update(cpu_time=round(exit.cpu_time, 6), max_rss_kb=exit.max_rss_kb)
    return values


def classify(exit: Exit, reason: str | None, *, timeout: float | None, memory_kb: int | None,
             rss_kb: int, success_codes: tuple[int, ...]) -> Outcome:
    """The outcome of a program that ended with ``exit``; ``reason`` is why soaf stopped
    it (``timed_out``, ``cancelled``, ``memory``, ``interrupted``) or None."""
    if reason == INTERRUPTED:
        return Outcome(INTERRUPTED, error="core stopped while it ran")
    if reason == State.CANCELLED.value:
        return Outcome(State.CANCELLED.value, error="cancelled while running")
    if reason == State.TIMED_OUT.value:
        how = " (SIGKILL after the grace period)" if exit.signal == "SIGKILL" else ""
        return Outcome(State.TIMED_OUT.value, "timeout",
                       f"ran past its timeout ({timeout or 0:g} s){how}")
    peak = exit.max_rss_kb or 0
    if reason == "memory" or (
        memory_kb and exit.signal == "SIGKILL" and peak >= MEMORY_NEAR * memory_kb
    ):
        used = max(rss_kb, peak)
        return Outcome(State.FAILED.value, "memory",
                       f"used {used / 1024:.0f} MiB, over its memory limit of "
                       f"{(memory_kb or 0) / 1024:g} MiB; killed")
    if exit.signal is not None:
        return Outcome(State.FAILED.value, "signal", f"killed by {exit.signal}")
    if exit.returncode not in success_codes:
        return Outcome(State.FAILED.value, "exit_code", f"exited with code {exit.returncode}")
    return Outcome(State.SUCCEEDED.value)


def attempt_summary(outcome: Outcome, number: int, node: str, started_at: float,
                    work_dir: Path | None, exit: Exit | None) -> dict[str, Any]:
    """Attempt ``number``'s entry in the record's ``attempts`` list."""
    summary: dict[str, Any] = {
        "attempt": number, "state": outcome.state, "failure": outcome.failure,
        "error": outcome.error, "node": node, "started_at": started_at,
        "ended_at": time.time(), "work_dir": str(work_dir) if work_dir else None,
    }
    if exit is not None:
        summary.update(exit_code=exit.exit_code, signal=exit.signal,
                       wall_time=round(exit.wall_time, 6))
    return summary
