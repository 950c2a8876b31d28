#!/usr/bin/env python3
"""Benchmark: what a core's TAKE costs Redis as the number of queues grows.

Starts a private redis-server (unix socket), makes N queues (services x priorities) with
entries waiting in each, and measures, per call of the TAKE script from one client:
  * take: a core with free slots takes ``--count`` entries from the ready queues (the
    busy case; every queue holds entries here, the worst case);
  * scan: every queue is drained and TAKE looks at all of them for where to wait (what a
    core does when the ready queues run dry, and every FULL_SCAN seconds when idle);
and Redis's own CPU time per call (INFO commandstats, usec_per_call of EVALSHA).

    .venv/bin/python bench/routing.py [--queues 10 100 300 1000] [--count 8] [--calls 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.private_redis import private_redis  # noqa: E402
from soaf.protocol.keys import GROUP, Keys  # noqa: E402
from soaf.protocol.queues import PRIORITY_AGING, member  # noqa: E402
from soaf.protocol.scripts import TAKE  # noqa: E402


def evalsha_usec(r: redis.Redis) -> float:
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    return float(stats.get("usec", 0))


def run(r: redis.Redis, queues: int, count: int, calls: int,
        ready: int | None) -> tuple[float, float, float, float]:
    """(take µs, its Redis µs, scan µs, its Redis µs) with ``queues`` queues, of which
    ``ready`` (None: all) hold entries."""
    keys = Keys(f"b{queues}-{ready}")
    services = [f"svc{i}" for i in range(max(1, queues // 3))]
    made = 0
    pipe = r.pipeline(transaction=False)
    for service in services:
        for priority in (0, 5, 10):
            if made == queues:
                break
            queue = keys.queue(service, priority)
            pipe.xgroup_create(queue, GROUP, id="0", mkstream=True)
            pipe.sadd(keys.queues, member(service, priority))
            if ready is None or made < ready:
                pipe.sadd(keys.ready, member(service, priority))
                for _ in range(count * calls // (ready or queues) + 2):
                    pipe.xadd(queue, {"payload": b"x" * 100})
            made += 1
    pipe.execute()
    names = [keys.queues, keys.submit, keys.ready, keys.new_queues]

    def timed(scan: int) -> tuple[float, float]:
        r.config_resetstat()
        start = time.perf_counter()
        for _ in range(calls):
            TAKE.run(r, names, [GROUP, "core", count, int(time.time() * 1000),
                                int(PRIORITY_AGING * 1000), keys.queue_prefix, scan, *services])
        return (time.perf_counter() - start) / calls * 1e6, evalsha_usec(r) / calls

    take_wall, take_cpu = timed(0)
    while TAKE.run(r, names, [GROUP, "core", 10_000, int(time.time() * 1000),
                              int(PRIORITY_AGING * 1000), keys.queue_prefix, 1, *services])[0]:
        pass  # drain
    scan_wall, scan_cpu = timed(1)
    return take_wall, take_cpu, scan_wall, scan_cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--queues", type=int, nargs="+", default=[10, 100, 300, 1000])
    ap.add_argument("--count", type=int, default=8, help="entries one take asks for")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--ready", type=int, default=10,
                    help="queues holding entries in the second run of each size")
    opts = ap.parse_args()
    with private_redis() as (_tmp, r):
        print(f"TAKE of {opts.count} entries, {opts.calls} calls, one client, unix socket")
        print(f"{'queues':>7} {'ready':>6} {'take µs':>9} {'take Redis µs':>14} {'scan µs':>9} "
              f"{'scan Redis µs':>14}")
        for n in opts.queues:
            for ready in (None, opts.ready):
                if ready is not None and ready >= n:
                    continue
                take_wall, take_cpu, scan_wall, scan_cpu = run(r, n, opts.count, opts.calls, ready)
                print(f"{n:>7} {ready or n:>6} {take_wall:>9.0f} {take_cpu:>14.0f} "
                      f"{scan_wall:>9.0f} {scan_cpu:>14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
