"""Per-program cgroups against a fake cgroupfs directory (these machines have cgroup v1, owned
by the host), and the shim entering one with a real sh."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from soaf.process import cgroup, shim


def fake(tmp_path: Path, controllers: str = "cpu memory pids", own: str = "/svc") -> Path:
    fs = tmp_path / "cgroupfs"
    root = fs / own.lstrip("/")
    root.mkdir(parents=True)
    (fs / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text(f"{os.getpid()}\n")
    (tmp_path / "self").write_text(f"0::{own}\n")
    return fs


def test_detects_a_delegated_v2_hierarchy_and_sets_it_up(tmp_path):
    fs = fake(tmp_path)
    found, how = cgroup.detect(fs=fs, proc_cgroup=tmp_path / "self")
    assert found is not None and found.root == fs / "svc" and "cgroup v2 delegated" in how
    found.prepare()
    assert (fs / "svc" / "soaf-core" / "cgroup.procs").read_text() == str(os.getpid())
    assert (fs / "svc" / "cgroup.subtree_control").read_text() == "+memory"
    path = found.create("sid.1", memory_max_kb=150 * 1024)
    assert (path / "memory.max").read_text() == str(150 * 1024 * 1024)
    assert not cgroup.oom_killed(path)  # no memory.events yet
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    assert not cgroup.oom_killed(path)
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    assert cgroup.oom_killed(path)
    # a core that starts again in its own leaf finds the same root
    (tmp_path / "self").write_text("0::/svc/soaf-core\n")
    again, _ = cgroup.detect(fs=fs, proc_cgroup=tmp_path / "self")
    assert again is not None and again.root == fs / "svc"


def test_falls_back_and_says_why(tmp_path):
    v1 = tmp_path / "v1"
    v1.mkdir()
    (tmp_path / "self").write_text("4:memory:/x\n0::/\n")
    found, how = cgroup.detect(fs=v1, proc_cgroup=tmp_path / "self")
    assert found is None and "cgroup v1" in how and "polled" in how
    no_memory = fake(tmp_path / "a", controllers="cpu pids")
    found, how = cgroup.detect(fs=no_memory, proc_cgroup=tmp_path / "a" / "self")
    assert found is None and "memory controller is not delegated" in how
    # and on this machine: whatever it has, it says which mode it uses
    found, how = cgroup.detect()
    assert ("delegated" in how) == (found is not None)


def test_the_shim_enters_the_programs_cgroup(tmp_path):
    group = tmp_path / "sid.1"
    group.mkdir()
    argv, shimmed = shim.wrap(["sh", "-c", "exit 5"], cwd=tmp_path, env=dict(os.environ),
                              exit_file=tmp_path / "exit", cgroup=group)
    assert shimmed
    assert subprocess.run(argv, cwd=tmp_path).returncode == 5
    assert (group / "cgroup.procs").read_text() == "0\n"  # what moves a process itself
    assert shim.read_exit(tmp_path / "exit") == 5
