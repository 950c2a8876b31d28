"""GroupStop: SIGTERM, the grace period, then SIGKILL, once; with a clock and a recorder
in place of a process group, so every branch is seen."""

from __future__ import annotations

import signal

from soaf.process.stop import GroupStop


class Recorder:
    def __init__(self, alive: bool = True) -> None:
        self.sent: list[str] = []
        self.alive = alive

    def __call__(self, sig: int) -> bool:
        if not self.alive:
            return False
        self.sent.append(signal.Signals(sig).name)
        return True


def make(alive: bool = True) -> tuple[GroupStop, Recorder, list[float]]:
    now = [100.0]
    rec = Recorder(alive)
    return GroupStop(rec, clock=lambda: now[0]), rec, now


def test_term_then_kill_after_the_grace():
    stop, rec, now = make()
    stop.begin(5)
    assert rec.sent == ["SIGTERM"] and stop.stopping and stop.stopped_with == "SIGTERM"
    now[0] += 4.9
    stop.tick()
    assert rec.sent == ["SIGTERM"]
    now[0] += 0.2
    stop.tick()
    stop.tick()
    assert rec.sent == ["SIGTERM", "SIGKILL"] and stop.stopped_with == "SIGKILL"


def test_no_grace_kills_at_once_without_a_term():
    stop, rec, _ = make()
    stop.begin(0)
    assert rec.sent == ["SIGKILL"]


def test_a_more_urgent_stop_brings_the_kill_forward():
    stop, rec, now = make()
    stop.begin(60)
    now[0] += 1
    stop.begin(0)  # e.g. the memory limit, or a forced core stop
    assert rec.sent == ["SIGTERM", "SIGKILL"]
    stop.begin(60)  # a later, gentler request changes nothing
    assert rec.sent == ["SIGTERM", "SIGKILL"]


def test_a_group_that_is_gone_is_not_recorded_as_stopped():
    stop, rec, _ = make(alive=False)
    stop.begin(5)
    assert stop.stopped_with is None and rec.sent == []


def test_the_kill_log_says_how_long_after_the_term(caplog):
    caplog.set_level("INFO", logger="soaf.process.stop")
    stop, _, now = make()
    stop.begin(5)
    now[0] += 5.2
    stop.tick()
    assert "still running 5.2 s after SIGTERM; sent SIGKILL" in caplog.text
    caplog.clear()
    stop, _, now = make()
    stop.begin(60)
    now[0] += 0.004
    stop.begin(0)  # a forced stop: not "still running after SIGTERM"
    assert "stop made urgent 0.004 s after SIGTERM; sent SIGKILL" in caplog.text
    assert "still running" not in caplog.text
