#!/usr/bin/env python3
"""Benchmark: what capping a chatty program's output costs (soaf.core.logkeeper.LogKeeper).

A program (tests/programs/chatty.py) prints --mb MiB of 92-byte lines into an O_APPEND
file, as a service's stdout. It runs once alone and once with a LogKeeper pass every
--interval seconds (every FLOOD_INTERVAL while it cuts; cap --cap-kb), on tmpfs
(/dev/shm: hole punching) and on the main disk (the temp dir: range collapsing where
the file system has it). Printed: the
program's wall time both ways, the keeper's CPU time, the most disk the file took
(allocated blocks, sampled before each pass), the file left at the end, and the lines
the keeper copied for Redis (collected in memory here, not sent).

    .venv/bin/python bench/logs.py [--mb 200] [--cap-kb 1024] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from soaf.core.logkeeper import FLOOD_INTERVAL, LogKeeper, LogLines  # noqa: E402

CHATTY = ROOT / "tests" / "programs" / "chatty.py"


def run_program(path: Path, nbytes: int) -> float:
    with open(path, "ab") as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(CHATTY), str(nbytes)], stdout=out,
                       stderr=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t0


def measure(base: Path, opts: argparse.Namespace) -> dict[str, float]:
    nbytes = opts.mb * 1024 * 1024
    d = Path(tempfile.mkdtemp(prefix="soaf-logbench-", dir=base))
    try:
        alone = run_program(d / "alone.log", nbytes)
        (d / "alone.log").unlink()

        lines = [0]

        def sink(item: LogLines) -> None:
            lines[0] += len(item.entries)

        keeper = LogKeeper(sink, max_bytes=opts.cap_kb * 1024, interval=opts.interval,
                           lines=1000)
        path = d / "stdout.log"
        path.touch()
        handle = keeper.add("bench", 1, {"stdout": path})
        stop = threading.Event()
        stats = {"cpu": 0.0, "peak": 0, "passes": 0}

        def loop() -> None:  # what LogKeeper's own thread does, with measurements
            wait = opts.interval
            while not stop.wait(wait):
                stats["peak"] = max(stats["peak"], os.stat(path).st_blocks * 512)
                t = time.thread_time()
                trims = keeper.tick()
                stats["cpu"] += time.thread_time() - t
                stats["passes"] += 1
                wait = min(opts.interval, FLOOD_INTERVAL) if trims else opts.interval

        thread = threading.Thread(target=loop)
        thread.start()
        with_keeper = run_program(path, nbytes)
        stop.set()
        thread.join()
        stats["peak"] = max(stats["peak"], os.stat(path).st_blocks * 512)
        t = time.thread_time()
        keeper.finish(handle)
        finish_cpu = time.thread_time() - t
        return {
            "alone": alone, "with": with_keeper, "cpu": stats["cpu"], "finish": finish_cpu,
            "passes": stats["passes"], "peak": stats["peak"], "final": path.stat().st_size,
            "lines": lines[0], "method": handle.files[0].method or "none",
            "trims": keeper.trims,
        }
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--cap-kb", type=int, default=1024)
    ap.add_argument("--interval", type=float, default=0.5)
    opts = ap.parse_args()
    print(f"soaf log cap: a program printing {opts.mb} MiB; cap {opts.cap_kb} KiB; "
          f"a keeper pass every {opts.interval:g} s")
    bases = [("tmpfs", Path("/dev/shm")), ("disk", Path(tempfile.gettempdir()))]
    for kind, base in bases:
        if not base.is_dir():
            continue
        r = measure(base, opts)
        print(f"{kind:>5} {base!s:<9} method {r['method']:<8} program {r['alone']:.2f} s alone, "
              f"{r['with']:.2f} s capped; keeper CPU {r['cpu'] * 1000:.0f} ms in {r['passes']} "
              f"passes ({r['cpu'] * 1000 / opts.mb:.2f} ms/MiB) + {r['finish'] * 1000:.1f} ms "
              f"at the end; {r['trims']} trims; most disk {r['peak'] / 1024 / 1024:.1f} MiB; "
              f"file left {r['final'] / 1024:.0f} KiB; {r['lines']} lines copied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
