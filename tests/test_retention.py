"""The retention sweep: what it removes, trims and keeps, and never a dir in use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from soaf.config import ConfigError, RetentionPolicy, Settings
from soaf.data import holds
from soaf.data.markers import mark_finished, mark_started, runs_dir, work_root_lock
from soaf.data.retention import Sweeper, sweep

HOUR = 3600.0
MARKERS: dict = {}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def run(root: Path, sid: str, state: str | None, *, size: int = 10, work_path: str | None = None,
        outputs: list[str] | None = None) -> Path:
    """A finished (or, with state None, running) service with a ``size``-byte file."""
    work_dir = (root / (work_path or sid)).resolve()
    MARKERS[sid] = mark_started(root, sid, work_path or sid)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / f"{sid}.dat").write_bytes(b"x" * size)
    (work_dir / "stdout.log").write_text("log\n")
    if state is not None:
        mark_finished(MARKERS[sid], state, outputs)
    return work_dir


def policy(**kw) -> RetentionPolicy:
    return RetentionPolicy(**{"keep_succeeded_hours": 24, "keep_failed_hours": 168, **kw})


def test_succeeded_removed_after_its_hours_failed_kept_longer(root):
    ok = run(root, "ok", "succeeded")
    bad = run(root, "bad", "failed")
    gone = run(root, "gone", "timed_out")
    assert sweep(root, policy(), now=time.time() + HOUR).removed == []
    report = sweep(root, policy(), now=time.time() + 25 * HOUR)
    assert [r["dir"] for r in report.removed] == ["ok"]
    assert not ok.exists() and bad.exists() and gone.exists()
    report = sweep(root, policy(), now=time.time() + 169 * HOUR)
    assert sorted(r["dir"] for r in report.removed) == ["bad", "gone"]
    assert not bad.exists() and not gone.exists()
    assert list(runs_dir(root).iterdir()) == []  # markers go with their dirs
    assert sweep(root, policy(keep_failed_hours=float("inf")), now=time.time() + 1e9).removed == []


def test_keep_and_outputs_modes(root):
    kept = run(root, "kept", "succeeded")
    later = time.time() + 25 * HOUR
    assert sweep(root, policy(on_success="keep"), now=later).removed == []
    assert (kept / "kept.dat").exists()

    trimmed = run(root, "trim", "succeeded", outputs=["res/out.txt"])
    (trimmed / "res").mkdir()
    (trimmed / "res" / "out.txt").write_text("result")
    (trimmed / "scratch").mkdir()
    (trimmed / "scratch" / "big.tmp").write_bytes(b"y" * 1000)
    report = sweep(root, policy(on_success="outputs"), now=later)
    assert {t["dir"] for t in report.trimmed} == {"kept", "trim"}
    remaining = sorted(p.relative_to(trimmed).as_posix() for p in trimmed.rglob("*"))
    assert remaining == ["res", "res/out.txt", "stdout.log"]
    assert sweep(root, policy(on_success="outputs"), now=later).trimmed == []  # once only


def test_never_a_running_service_or_a_dir_in_use(root):
    running = run(root, "running", None)  # marker says running, this process is alive
    in_use = run(root, "inuse", "succeeded")
    report = sweep(root, policy(keep_succeeded_hours=0, keep_failed_hours=0, max_bytes=1),
                   in_use=lambda: {in_use}, now=time.time() + 1e6)
    assert running.exists() and in_use.exists()
    assert {k["dir"]: k["reason"] for k in report.kept} == {"running": "in use", "inuse": "in use"}


def test_shared_work_path_stays_while_any_service_uses_it(root):
    shared = run(root, "first", "succeeded", work_path="shared/area")
    run(root, "second", None, work_path="shared/area")
    everything = policy(keep_succeeded_hours=0, keep_failed_hours=0)
    sweep(root, everything, now=time.time() + HOUR)
    assert (shared / "first.dat").exists() and (shared / "second.dat").exists()
    mark_finished(MARKERS["second"], "succeeded")
    assert [r["dir"] for r in sweep(root, everything, now=time.time() + HOUR).removed] == [
        "shared/area"]
    assert not shared.exists()


def test_a_run_whose_core_died_counts_as_failed(root):
    orphan = run(root, "orphan", None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker = runs_dir(root) / "orphan.json"
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({**data, "pid": dead.pid}))
    assert sweep(root, policy(), now=time.time() + 25 * HOUR).removed == []  # failed: 168 h
    report = sweep(root, policy(), now=time.time() + 169 * HOUR)
    assert [r["dir"] for r in report.removed] == ["orphan"] and not orphan.exists()


def test_size_cap_removes_oldest_succeeded_first(root):
    old_ok = run(root, "old-ok", "succeeded", size=4000)
    old_bad = run(root, "old-bad", "failed", size=4000)
    time.sleep(0.01)
    new_ok = run(root, "new-ok", "succeeded", size=4000)
    running = run(root, "busy", None, size=4000)
    report = sweep(root, policy(max_bytes=9000))  # nothing is old: only the cap acts
    assert [r["dir"] for r in report.removed] == ["old-ok", "new-ok"]
    assert not old_ok.exists() and not new_ok.exists() and old_bad.exists() and running.exists()
    report = sweep(root, policy(max_bytes=5000))
    assert [r["dir"] for r in report.removed] == ["old-bad"]
    assert running.exists()


def test_dirs_without_markers_and_dry_runs_are_left_alone(root):
    foreign = root / "not-soaf"
    foreign.mkdir()
    (foreign / "f").write_text("mine")
    ok = run(root, "ok", "succeeded")
    report = sweep(root, policy(keep_succeeded_hours=0), dry_run=True)
    assert [r["dir"] for r in report.removed] == ["ok"] and report.freed > 0
    assert ok.exists()
    sweep(root, policy(keep_succeeded_hours=0, keep_failed_hours=0, max_bytes=1))
    assert (foreign / "f").exists() and not ok.exists()


def test_a_dir_taken_again_during_the_sweep_is_kept(root):
    ok = run(root, "ok", "succeeded")
    calls = []

    def in_use() -> set[Path]:
        calls.append(1)  # first look: free; re-check under the lock: a service took it
        return set() if len(calls) == 1 else {ok}

    report = sweep(root, policy(keep_succeeded_hours=0), in_use=in_use)
    assert report.removed == [] and {"dir": "ok", "reason": "taken again"} in report.kept
    assert ok.exists()


def test_a_retry_that_takes_its_dir_again_during_the_sweep_keeps_it(root):
    """The dir's own marker is read again under the lock: a retry of the same service
    that restarted in it after the sweep's first look keeps it."""
    ok = run(root, "ok", "succeeded")
    calls = []

    def in_use() -> set[Path]:
        calls.append(1)
        if len(calls) == 2:  # under the lock, before the dir is checked again
            mark_started(root, "ok", "ok")  # (its marker says running again)
        return set()

    report = sweep(root, policy(keep_succeeded_hours=0), in_use=in_use)
    assert report.removed == [] and {"dir": "ok", "reason": "taken again"} in report.kept
    assert ok.exists()


def test_a_dir_taken_during_the_sweep_stays_taken_through_its_later_holds(root, monkeypatch):
    """The sweep lets the lock go between batches of dirs; a service marker read by one
    hold still counts in the next ones (it is not read again)."""
    monkeypatch.setattr(holds, "HOLD_DIRS", 1)
    first = run(root, "a", "succeeded")
    time.sleep(0.01)
    taken = run(root, "b", "succeeded")
    calls = []

    def in_use() -> set[Path]:
        calls.append(1)
        if len(calls) == 1:  # after the first look: a service starts in b's dir
            mark_started(root, "again", "b")
        return set()

    report = sweep(root, policy(keep_succeeded_hours=0), in_use=in_use)
    assert [r["dir"] for r in report.removed] == ["a"] and not first.exists()
    assert taken.exists() and {"dir": "b", "reason": "taken again"} in report.kept
    assert len(calls) == 3  # the first look, and one hold for each dir


def test_a_marker_being_written_holds_every_removal_back(root):
    """A marker that cannot be read yet may name any dir: nothing is removed meanwhile
    (one left unreadable for a minute is taken as damaged and ignored)."""
    ok = run(root, "ok", "succeeded")
    (runs_dir(root) / "half.json").write_text('{"service_id": "half", "work_')
    report = sweep(root, policy(keep_succeeded_hours=0))
    assert report.removed == [] and ok.exists()
    os.utime(runs_dir(root) / "half.json", (time.time() - 120, time.time() - 120))
    assert [r["dir"] for r in sweep(root, policy(keep_succeeded_hours=0)).removed] == ["ok"]


def test_nested_work_paths_are_kept_and_a_shared_prefix_is_not_nesting(root):
    outer = run(root, "outer", "succeeded", work_path="area")
    inner = run(root, "inner", "succeeded", work_path="area/deep/inner")
    beside = run(root, "beside", "succeeded", work_path="area-2")
    report = sweep(root, policy(keep_succeeded_hours=0))
    assert [r["dir"] for r in report.removed] == ["area-2"] and not beside.exists()
    assert outer.exists() and inner.exists()
    assert {k["dir"] for k in report.kept if k["reason"] == "nested work paths"} == {
        "area", "area/deep/inner"}


def test_only_a_measuring_sweep_walks_the_whole_root(root):
    run(root, "ok", "succeeded", size=1000)
    assert sweep(root, policy()).total_before > 1000
    assert sweep(root, policy(), measure=False).total_before == 0
    assert sweep(root, policy(max_bytes=10**9), measure=False).total_before > 1000


def test_removal_waits_for_a_service_taking_the_lock(root):
    """A service start holds the lock shared; the sweep's removal needs it exclusive."""
    import threading

    run(root, "ok", "succeeded")
    done = threading.Event()
    with work_root_lock(root, exclusive=False):
        thread = threading.Thread(target=lambda: (sweep(root, policy(keep_succeeded_hours=0)),
                                                  done.set()))
        thread.start()
        assert not done.wait(0.5)
        mark_started(root, "again", "ok")  # a service re-uses the dir
    thread.join(10)
    assert (root / "ok").exists()


def test_sweeper_thread(root):
    ok = run(root, "ok", "succeeded")
    sweeper = Sweeper(root, policy(keep_succeeded_hours=0), interval=0.05, in_use=set)
    sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while ok.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sweeper.stop()
    assert not ok.exists()


def test_policy_from_env_and_flags(monkeypatch):
    monkeypatch.setenv("SOAF_ON_SUCCESS", "outputs")
    monkeypatch.setenv("SOAF_KEEP_FAILED_HOURS", "inf")
    monkeypatch.setenv("SOAF_MAX_WORK_BYTES", "20G")
    p = RetentionPolicy.load(keep_succeeded_hours=2)
    assert (p.on_success, p.keep_succeeded_hours, p.keep_failed_hours, p.max_bytes) == (
        "outputs", 2, float("inf"), 20 * 1024**3)
    assert Settings.load().retention == p.__class__.load()
    monkeypatch.setenv("SOAF_ON_SUCCESS", "shred")
    with pytest.raises(ConfigError, match="on success must be one of"):
        RetentionPolicy.load()
    with pytest.raises(ConfigError, match="size like"):
        RetentionPolicy.load(on_success="keep", max_bytes="lots")


def test_soaf_gc_command(root):
    ok = run(root, "ok", "succeeded")
    bad = run(root, "bad", "failed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOAF_")}
    cmd = [sys.executable, "-m", "soaf.cli", "gc", "--work-root", str(root),
           "--keep-succeeded-hours", "0"]
    dry = subprocess.run([*cmd, "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "would remove ok" in dry.stdout and ok.exists()
    real = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert real.returncode == 0, real.stderr
    report = json.loads(real.stdout)
    assert [r["dir"] for r in report["removed"]] == ["ok"]
    assert not ok.exists() and bad.exists()
    wrong = subprocess.run([*cmd, "--max-work-bytes", "lots"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert wrong.returncode == 1 and "size like 500M" in wrong.stderr
