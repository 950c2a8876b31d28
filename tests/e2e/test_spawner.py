"""The core's spawner for real: a core killed -9 leaves its programs' exits (and what they
cost) to the next core; a spawner killed -9 loses no exit, and is replaced."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from soaf.process.lineage import direct_children
from tests.conftest import wait_until
from tests.e2e.test_recovery import history, hold, lines, running_on


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    path = tmp_path / "hold-log"
    path.mkdir()
    return path


def spawners(core) -> list[int]:
    """The pids of a core's spawners (its children that run soaf.process.spawnserver)."""
    found = []
    for pid in direct_children(core.proc.pid):
        try:
            if b"spawnserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def test_a_restarted_core_learns_how_a_program_ended_and_what_it_cost(start_core, client,
                                                                       logdir):
    a = start_core()
    ended = hold(client, logdir, 1.0, code=3)  # ends while no core runs
    adopted = hold(client, logdir, 5.0)  # still runs when the next core starts
    wait_until(lambda: len(running_on(client, [ended, adopted], "core-a")) == 2, 30,
               message="both running")
    [spawner] = spawners(a)
    a.kill()
    assert os.path.exists(f"/proc/{spawner}")  # it outlives its core
    wait_until(lambda: ["end", ended] in [w[:2] for w in lines(logdir, "runs.log")], 30,
               message="the first program to end with no core")
    start_core()
    first, second = client.wait_all([ended, adopted], timeout=60)
    assert first.get("recovered_as") == "collect" and first.exit_code == 3, first.raw
    assert second.get("recovered_as") == "adopt" and second.exit_code == 0, second.raw
    for record in (first, second):
        history(client, record.service_id)
        assert record.attempt == 1
        # the dead core's spawner reaped it, and wrote what it cost in its exit file
        assert record.get("cpu_time") > 0 and record.get("max_rss_kb") > 1024, record.raw


def test_a_killed_spawner_loses_no_exit_and_is_replaced(start_core, client, logdir):
    core = start_core()
    ids = [hold(client, logdir, 2.0, code=i) for i in (0, 3)]
    wait_until(lambda: len(running_on(client, ids, "core-a")) == 2, 30, message="running")
    [first] = spawners(core)
    os.kill(first, signal.SIGKILL)
    ok, failed = client.wait_all(ids, timeout=60)
    assert ok.state == "succeeded" and ok.exit_code == 0, ok.raw
    assert failed.state == "failed" and failed.exit_code == 3, failed.raw
    assert "the spawner (pid" in core.log()
    wait_until(lambda: len(spawners(core)) == 1 and spawners(core) != [first], 30,
               message="a new spawner")
    after = client.wait(hold(client, logdir, 0.1, code=4), timeout=60)
    assert after.exit_code == 4 and after.get("shim_pid") is None  # spawned by the new one
    assert core.alive()
