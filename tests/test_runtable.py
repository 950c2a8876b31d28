"""The run table holds the entry of an ended run until its final state is in Redis, and
forgets it when told so (no scan of every finishing run per call)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from soaf.core.runtable import RunTable
from soaf.run.control import Once


def fake_run(service_id: str, entry_id: str, *, final_queued: bool = True) -> Any:
    return SimpleNamespace(service_id=service_id, claim=SimpleNamespace(entry_id=entry_id),
                           final_queued=final_queued, final_written=threading.Event(),
                           on_final_written=Once(), work_dir=None)


def written(run: Any) -> None:
    """What ServiceRun._final_written does: listeners first, then the event."""
    run.on_final_written.fire()
    run.final_written.set()


def test_an_ended_run_is_held_until_its_final_state_is_written():
    table = RunTable()
    runs = [fake_run(f"s{i}", f"e{i}") for i in range(3)]
    for run in runs:
        table.add(run)
    assert table.entries() == {"e0", "e1", "e2"}
    table.done(runs[0])
    table.done(runs[1])
    assert table.entries() == {"e0", "e1", "e2"} and len(table) == 1
    written(runs[0])
    assert table.entries() == {"e1", "e2"}
    assert [e for e, _ in table.not_held([("e0", {}), ("e1", {}), ("e9", {})])] == ["e0", "e9"]


def test_a_run_written_before_it_is_done_or_without_a_final_is_not_held():
    table = RunTable()
    early, interrupted = fake_run("a", "ea"), fake_run("b", "eb", final_queued=False)
    for run in (early, interrupted):
        table.add(run)
    written(early)
    table.done(early)
    table.done(interrupted)
    assert table.entries() == set()


def test_once_calls_early_listeners_when_fired_and_late_ones_at_once():
    once, seen = Once(), []
    once.add(seen.append, "early")
    once.add(lambda: 1 / 0)  # one that raises does not stop the others
    once.add(seen.append, "second")
    assert seen == []
    once.fire()
    assert seen == ["early", "second"]
    once.add(seen.append, "late")
    once.fire()  # each listener is called once
    assert seen == ["early", "second", "late"]
