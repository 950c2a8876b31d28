#!/usr/bin/env python3
"""Benchmark: what the work-root sweep costs a core that keeps many finished work dirs.

A core keeps each finished service's work dir for ``keep_succeeded_hours`` (24 by
default) and sweeps its work root at start and every ``SOAF_GC_INTERVAL`` seconds: one
that runs a service a second keeps ~86,000 dirs. For each size this makes that many
finished dirs (a run marker, stdout.log and stderr.log each, on tmpfs unless --dir is
given) and measures, in this process:

  1. a sweep that removes nothing (a core's periodic sweep: ``measure=False``);
  2. a sweep that removes every dir (all expired);

printing the CPU seconds of each, while a thread starts services as a core does (a run
marker and a work dir each, under the work root's lock held shared), and the longest a
start waited for the lock.

    .venv/bin/python bench/sweep.py [--sizes 1000 4000 16000] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from soaf.config import RetentionPolicy
from soaf.data.markers import mark_finished, mark_started, work_root_lock
from soaf.data.retention import sweep

DAY = 86400.0


def make_root(parent: Path, n: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="soaf-sweep-", dir=parent))
    for i in range(n):
        sid = f"{i:032x}"
        marker = mark_started(root, sid, sid)
        (root / sid).mkdir()
        for name in ("stdout.log", "stderr.log"):
            (root / sid / name).write_text("")
        mark_finished(marker, "succeeded")
    return root


class StartingServices:
    """A thread that starts services as a core does, one a millisecond: under the lock
    held shared, a run marker and a work dir each. The longest it waited for the lock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.longest = 0.0
        self.started = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            with work_root_lock(self.root, exclusive=False):
                self.longest = max(self.longest, time.perf_counter() - t0)
                sid = uuid.uuid4().hex
                mark_started(self.root, sid, sid)
                (self.root / sid).mkdir()
            self.started += 1
            time.sleep(0.001)

    def __enter__(self) -> StartingServices:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed(root: Path, policy: RetentionPolicy, now: float | None = None
          ) -> tuple[float, float, int, int]:
    """(CPU seconds of this thread, longest wait of a service start in seconds, dirs
    removed, services started meanwhile)."""
    with StartingServices(root) as starts:
        t0 = time.thread_time()
        report = sweep(root, policy, measure=False, now=now)  # (as a core's sweeps)
        cpu = time.thread_time() - t0
    return cpu, starts.longest, len(report.removed), starts.started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--dir", type=Path, default=None, help="make the work roots here")
    opts = ap.parse_args()
    parent = opts.dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else
                          Path(tempfile.gettempdir()))
    policy = RetentionPolicy()
    print(f"work roots under {parent}; policy: succeeded dirs kept "
          f"{policy.keep_succeeded_hours:g} h")
    for n in opts.sizes:
        root = make_root(parent, n)
        try:
            cpu, wait, _, started = timed(root, policy)
            print(f"{n:>7} dirs, none due: sweep {cpu:.2f} s CPU ({cpu / n * 1e6:.0f} us a dir); "
                  f"{started} services started meanwhile, each waited at most {wait * 1000:.1f} ms")
            cpu, wait, removed, started = timed(root, policy, now=time.time() + 2 * DAY)
            print(f"{n:>7} dirs, all due:  sweep {cpu:.2f} s CPU ({cpu / n * 1e6:.0f} us a dir), "
                  f"{removed} removed; {started} services started meanwhile, each waited at most "
                  f"{wait * 1000:.1f} ms")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
