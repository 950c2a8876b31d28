#!/usr/bin/env python3
"""Benchmark: the dashboard over 100,000 records, and live updates to 50 browsers.

Starts a private redis-server (unix socket), writes --records service records (and the
``soaf:services`` index) the way cores leave them, then starts a real ``soaf dashboard``
process and measures:

1. the services page: the first page (50 rows) as HTML and as JSON (/api/services), a
   deep page (a cursor in the middle), and a filtered page (a rare state: the worst
   case, it looks at its whole budget of 5,000 records), each --repeat times;
2. live updates: --clients open SSE streams on /api/live while a writer changes the
   progress of --running services --rate times a second (HSET + PUBLISH on the notify
   channel, as cores do), for --seconds; the dashboard process's CPU time (from /proc)
   over that window, as a share of one core, idle (clients connected, nothing changes)
   and busy, plus the updates each client received.

    .venv/bin/python bench/dashboard.py [--records 100000] [--clients 50] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.private_redis import private_redis  # noqa: E402
from soaf.protocol.keys import Keys  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its waited-for children) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICK


def fill(r: redis.Redis, keys: Keys, n: int, running: int) -> list[str]:
    """``n`` records, one per 10 ms of submit time; the newest ``running`` are running."""
    now = time.time() - n * 0.01
    run_ids = []
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        sid = f"bench{i:07d}"
        ts = now + i * 0.01
        live = i >= n - running
        state = "running" if live else ("failed" if i % 25 == 0 else "succeeded")
        record = {"service_id": sid, "service": f"svc{i % 7}", "state": state,
                  "node": f"core-{i % 3}", "attempt": 1, "seq": 9, "submitted_at": ts,
                  "queued_at": ts, "running_at": ts + 0.002, "progress": 0.0 if live else 1.0,
                  "message": f"step {i % 100} of 100", "plugin_version": "3-abcdef12",
                  "work_dir": f"/work/{sid}", "command": ["./prog", "--in", "a.txt"]}
        if not live:
            record.update(finished_at=ts + 1.5, exit_code=0 if state == "succeeded" else 2,
                          wall_time=1.5)
        pipe.hset(keys.service(sid), mapping={k: json.dumps(v) for k, v in record.items()})
        pipe.zadd(keys.services, {sid: ts})
        if live:
            run_ids.append(sid)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    return run_ids


def timed(http: httpx.Client, path: str, repeat: int) -> tuple[float, list[float]]:
    """(first request ms, the next ``repeat`` in ms)."""
    def one() -> float:
        t0 = time.perf_counter()
        reply = http.get(path)
        ms = (time.perf_counter() - t0) * 1000
        assert reply.status_code == 200, (path, reply.status_code, reply.text[:300])
        return ms
    first = one()
    return first, [one() for _ in range(repeat)]


def report(name: str, first: float, rest: list[float]) -> None:
    rest = sorted(rest)
    print(f"  {name:<44} first {first:7.1f} ms   p50 {statistics.median(rest):6.1f} ms   "
          f"p95 {rest[int(len(rest) * 0.95) - 1]:6.1f} ms   max {rest[-1]:6.1f} ms")


def sse_client(url: str, counts: list[int], index: int, stop: threading.Event,
               ready: threading.Barrier) -> None:
    with httpx.Client(timeout=None) as http, http.stream("GET", url + "/api/live") as reply:
        ready.wait()
        for line in reply.iter_lines():
            if line.startswith("event: services"):
                counts[index] += 1
            if stop.is_set():
                return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--running", type=int, default=20, help="services whose progress moves")
    ap.add_argument("--clients", type=int, default=50, help="open SSE streams (browsers)")
    ap.add_argument("--rate", type=float, default=200, help="progress changes per second")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--repeat", type=int, default=30)
    opts = ap.parse_args()

    dashboard = None
    with private_redis("soaf-bench-dash-") as (tmp, r):
        sock = tmp / "redis.sock"
        try:
            keys = Keys()
            t0 = time.perf_counter()
            run_ids = fill(r, keys, opts.records, opts.running)
            print(f"{opts.records} records written in {time.perf_counter() - t0:.1f} s "
                  f"(Redis memory {r.info('memory')['used_memory_human']})")

            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("SOAF_")}
            env.update(SOAF_REDIS_URL=f"unix://{sock}", SOAF_DASHBOARD_TOKEN="bench-token")
            log = open(tmp / "dashboard.log", "wb")  # noqa: SIM115
            dashboard = subprocess.Popen([sys.executable, "-m", "soaf.cli", "dashboard", "--port",
                                          str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url, timeout=30) as http:
                for _ in range(300):
                    try:
                        if http.get("/api/nodes").status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.1)
                print(f"pages over {opts.records} records ({opts.repeat} requests each after the first):")
                report("/services (first page, HTML)", *timed(http, "/services", opts.repeat))
                report("/api/services (first page, JSON)", *timed(http, "/api/services", opts.repeat))
                middle = f"bench{opts.records // 2:07d}"
                score = r.zscore(keys.services, middle)
                report("/services?cursor=<middle> (deep page)",
                       *timed(http, f"/services?cursor={score!r}:{middle}", opts.repeat))
                report("/services?state=timed_out (none: 5,000 looked at)",
                       *timed(http, "/services?state=timed_out", opts.repeat))

            for phase, rate in (("idle", 0.0), ("busy", opts.rate)):
                counts = [0] * opts.clients
                stop = threading.Event()
                ready = threading.Barrier(opts.clients + 1)
                threads = [threading.Thread(target=sse_client, args=(url, counts, i, stop, ready),
                                            daemon=True) for i in range(opts.clients)]
                for t in threads:
                    t.start()
                ready.wait(timeout=60)
                time.sleep(1.0)  # connections settled
                before, t0 = cpu_seconds(dashboard.pid), time.perf_counter()
                changes = 0
                while (elapsed := time.perf_counter() - t0) < opts.seconds:
                    if rate:
                        sid = random.choice(run_ids)
                        pipe = r.pipeline(transaction=False)
                        pipe.hset(keys.service(sid), "progress", json.dumps(random.random()))
                        pipe.publish(keys.notify, json.dumps({"id": sid, "seq": changes}))
                        pipe.execute()
                        changes += 1
                        time.sleep(max(0.0, changes / rate - (time.perf_counter() - t0)))
                    else:
                        time.sleep(0.1)
                used = cpu_seconds(dashboard.pid) - before
                stop.set()
                print(f"live updates, {phase}: {opts.clients} SSE clients, {changes} changes in "
                      f"{elapsed:.1f} s: dashboard CPU {used:.2f} s = {100 * used / elapsed:.1f}% of "
                      f"one core; 'services' updates per client: min {min(counts)}, "
                      f"max {max(counts)}")
                # The clients end at their next line (a ping or an update); wait for none.
        finally:
            if dashboard is not None:
                dashboard.terminate()
                dashboard.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
