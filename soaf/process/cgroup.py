"""Per-program memory cgroups (cgroup v2), where the core's own cgroup is delegated to it.

A polled memory limit (soaf.run.limits) lets a fast allocator overshoot by what it
allocates between two looks. Where the kernel can enforce the limit instead, it does:
``detect`` finds a cgroup v2 hierarchy in which the core's cgroup lists ``memory`` in
``cgroup.controllers`` and is writable (delegated to the core's user, as systemd does
with ``Delegate=yes``). Then ``Cgroups.prepare`` moves the core into a leaf of its own
(``soaf-core``: a cgroup with processes cannot hand controllers down) and enables the
memory controller for its children; each program with a memory limit then runs in a
cgroup of its own (``create``) with ``memory.max``, which the program enters before it
is executed (its spawner's child does so, soaf.process.spawnserver, or its shim,
soaf.process.shim), and ``oom_killed`` reads ``memory.events`` to
tell a kill by that limit. Elsewhere (cgroup v1, or a hierarchy owned by the host) soaf
polls, and ``detect`` says why. No Redis here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Where the cgroup v2 hierarchy is mounted.
CGROUP_FS = Path("/sys/fs/cgroup")
#: The leaf the core moves itself into, beside its programs' cgroups.
CORE_LEAF = "soaf-core"


@dataclass(frozen=True)
class Cgroups:
    """The core's delegated cgroup, which holds one cgroup per limited program."""

    root: Path

    def prepare(self) -> None:
        """Move this process into ``CORE_LEAF`` and enable the memory controller below
        ``root``; OSError if the kernel refuses."""
        leaf = self.root / CORE_LEAF
        leaf.mkdir(exist_ok=True)
        procs = (self.root / "cgroup.procs").read_text().split()
        for pid in procs:  # the core's processes: the root must hold none
            with contextlib.suppress(ProcessLookupError, OSError):
                (leaf / "cgroup.procs").write_text(pid)
        (self.root / "cgroup.subtree_control").write_text("+memory")

    def create(self, name: str, *, memory_max_kb: int) -> Path:
        """A new cgroup for one program, limited to ``memory_max_kb`` (no swap beyond)."""
        path = self.root / name
        path.mkdir(exist_ok=True)
        (path / "memory.max").write_text(str(memory_max_kb * 1024))
        with contextlib.suppress(OSError):  # no swap accounting on this kernel
            (path / "memory.swap.max").write_text("0")
        return path


def oom_killed(path: Path) -> bool:
    """True if the kernel killed a process of cgroup ``path`` for its ``memory.max``."""
    try:
        text = (path / "memory.events").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return value.strip() not in ("", "0")
    return False


def remove(path: Path) -> None:
    """Remove a program's cgroup once its processes are gone (a leftover is logged)."""
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove cgroup %s: %s", path, e)


def detect(*, fs: Path = CGROUP_FS,
           proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[Cgroups | None, str]:
    """``(Cgroups, how)`` where this process's cgroup v2 is delegated with the memory
    controller, else ``(None, why not)``; ``how`` is a sentence for the core's log."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError as e:
        return None, f"no cgroups ({e}); memory limits are polled"
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None or not (fs / "cgroup.controllers").exists():
        return None, "cgroup v1 (owned by the host); memory limits are polled"
    root = fs / own.lstrip("/")
    if root.name == CORE_LEAF:  # prepared by an earlier core in this process's cgroup
        root = root.parent
    try:
        controllers = (root / "cgroup.controllers").read_text().split()
    except OSError as e:
        return None, f"cgroup v2, but {root} cannot be read ({e}); memory limits are polled"
    if "memory" not in controllers:
        return None, (f"cgroup v2, but the memory controller is not delegated to {root}; "
                      "memory limits are polled")
    if not (os.access(root, os.W_OK) and os.access(root / "cgroup.subtree_control", os.W_OK)):
        return None, f"cgroup v2, but {root} is not writable (not delegated); memory limits are polled"
    return Cgroups(root), (f"cgroup v2 delegated at {root}: each program with a memory limit "
                           "gets a cgroup with memory.max")


def setup() -> Cgroups | None:
    """The delegated cgroup v2 for per-program memory limits, prepared, or None (limits
    are polled then); logs which mode is in use."""
    found, how = detect()
    if found is not None:
        try:
            found.prepare()
        except OSError as e:
            how = f"cgroup v2 at {found.root} refused its setup ({e}); polled"
            found = None
    log.info("memory limits: %s", how)
    return found
