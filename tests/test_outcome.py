"""Classifying how a program ended: one failure kind per cause."""

from __future__ import annotations

import signal

import pytest

from soaf.process.spawn import Exit
from soaf.run.outcome import FAILURES, INTERRUPTED, classify


def end(code: int = 0, *, sig: int | None = None, rss_kb: int = 1000) -> Exit:
    return Exit(returncode=-sig if sig else code, wall_time=1.0, cpu_time=0.5, max_rss_kb=rss_kb)


def judge(exit: Exit, reason: str | None = None, *, memory_kb: int | None = None):
    return classify(exit, reason, timeout=2.5, memory_kb=memory_kb, rss_kb=0,
                    success_codes=(0, 3))


@pytest.mark.parametrize("exit, reason, memory_kb, state, failure, error", [
    (end(0), None, None, "succeeded", None, None),
    (end(3), None, None, "succeeded", None, None),
    (end(1), None, None, "failed", "exit_code", "exited with code 1"),
    (end(sig=signal.SIGSEGV), None, None, "failed", "signal", "killed by SIGSEGV"),
    (end(sig=signal.SIGTERM), "timed_out", None, "timed_out", "timeout",
     "ran past its timeout (2.5 s)"),
    (end(sig=signal.SIGKILL), "timed_out", None, "timed_out", "timeout",
     "ran past its timeout (2.5 s) (SIGKILL after the grace period)"),
    (end(sig=signal.SIGKILL, rss_kb=70 * 1024), "memory", 60 * 1024, "failed", "memory",
     "used 70 MiB, over its memory limit of 60 MiB; killed"),
    # killed by someone else (the kernel's OOM killer) close to its limit: memory
    (end(sig=signal.SIGKILL, rss_kb=58 * 1024), None, 60 * 1024, "failed", "memory",
     "used 58 MiB, over its memory limit of 60 MiB; killed"),
    # ... but far below it: just a signal
    (end(sig=signal.SIGKILL, rss_kb=10 * 1024), None, 60 * 1024, "failed", "signal",
     "killed by SIGKILL"),
    (end(sig=signal.SIGTERM), "cancelled", None, "cancelled", None, "cancelled while running"),
    (end(0), INTERRUPTED, None, INTERRUPTED, None, "core stopped while it ran"),
])
def test_classify(exit, reason, memory_kb, state, failure, error):
    outcome = judge(exit, reason, memory_kb=memory_kb)
    assert (outcome.state, outcome.failure, outcome.error) == (state, failure, error)
    assert failure is None or failure in FAILURES
    fields = outcome.fields()
    assert fields["state"] == state and fields.get("failure") == failure


def test_the_stderr_tail_is_read_only_for_an_error_that_shows_it(tmp_path, monkeypatch):
    from soaf.run import outcome as outcome_mod
    from soaf.run.outcome import Outcome, with_stderr

    stderr = tmp_path / "stderr.log"
    stderr.write_text("first\nboom\n")
    reads: list[object] = []
    real = outcome_mod.stderr_tail
    monkeypatch.setattr(outcome_mod, "stderr_tail", lambda path: reads.append(path) or real(path))
    assert with_stderr(Outcome("succeeded"), stderr, "s").error is None
    assert with_stderr(Outcome("cancelled", error="cancelled"), stderr, "s").error == "cancelled"
    assert with_stderr(Outcome("failed"), stderr, "s").error is None
    assert reads == []
    failed = with_stderr(Outcome("failed", "exit_code", "exit code 1"), stderr, "s")
    assert failed.error == ("exit code 1 (see soaf logs s --stderr); last lines of stderr:\n"
                            "first\nboom")
    assert reads == [stderr]
