#!/usr/bin/env python3
"""Benchmark: how many concurrent sleeping services one core holds, and what they cost it.

For each count N (default 200 and 1000): starts a private redis-server (unix socket)
and one real core process (start_core.py) with max_services >= N, work root on tmpfs
(/dev/shm) unless --work-root is given, submits N services whose program sleeps, and
waits until all N run. Then it measures, over --window seconds of steady state, the
core's CPU use (utime+stime from /proc) and its memory (VmRSS), threads and open
files; finally it cancels all N and times how long until every one is final and every
program is gone.

Each service has the default handler (file_change_callback every watch_interval,
default 1 s, listing the work dir) and its own thread; one supervisor thread per core
enforces the limits of all of them.

    .venv/bin/python bench/scale.py [--counts 200 1000] [--window 10] [--watch-interval 1]
                                    [--env SOAF_FILE_POLL=0 ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from soaf import Client, ServiceParamTemplate  # noqa: E402
from soaf.core.embedded import find_redis_server  # noqa: E402

PLUGIN = '''
from soaf import ServiceProgramTemplate

class Nap(ServiceProgramTemplate):
    name = "nap"
    def command(self):
        return ["sleep", str(self.template.args.get("seconds", 3600))]
'''
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def count_running(client: Client, ids: list[str]) -> int:
    pipe = client.redis.pipeline(transaction=False)
    for sid in ids:
        pipe.hget(client.keys.service(sid), "state")
    return sum(1 for s in pipe.execute() if s == b'"running"')


def measure(n: int, opts: argparse.Namespace, work_base: Path) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="soaf-scale-", dir="/tmp"))
    work_root = opts.work_root or Path(tempfile.mkdtemp(prefix="soaf-scale-work-", dir=work_base))
    plugins = tmp / "plugins"
    (plugins / "services").mkdir(parents=True)
    (plugins / "handlers").mkdir()
    (plugins / "services" / "__init__.py").write_text("")
    (plugins / "handlers" / "__init__.py").write_text("")
    (plugins / "services" / "nap.py").write_text(PLUGIN)
    sock = tmp / "redis.sock"
    server = subprocess.Popen([find_redis_server(), "--port", "0", "--unixsocket", str(sock),
                               "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                              stdout=subprocess.DEVNULL)
    url = f"unix://{sock}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOAF_")}
    env.update(SOAF_REDIS_URL=url, SOAF_SECRET="bench-secret", SOAF_PLUGINS=str(plugins),
               SOAF_WORK_ROOT=str(work_root), SOAF_NODE="scale",
               SOAF_MAX_SERVICES=str(n + 10), SOAF_KILL_GRACE="5")
    env.update(dict(item.split("=", 1) for item in opts.env))
    core = None
    result: dict[str, float] = {}
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        core_log = open(tmp / "core.log", "wb")  # noqa: SIM115
        core = subprocess.Popen([sys.executable, str(ROOT / "start_core.py"), "-q"], env=env,
                                cwd=str(ROOT), stdout=core_log, stderr=subprocess.STDOUT)
        client = Client(url, secret="bench-secret")
        warm = client.submit(ServiceParamTemplate("nap", args={"seconds": 0}))
        client.wait(warm, timeout=60)
        idle_rss = int(status(core.pid)["VmRSS"].split()[0])

        t0 = time.perf_counter()
        ids = [client.submit(ServiceParamTemplate(
            "nap", watch_interval=opts.watch_interval)) for _ in range(n)]
        deadline = time.monotonic() + 300
        while count_running(client, ids) < n:
            if time.monotonic() > deadline or core.poll() is not None:
                raise SystemExit(f"only {count_running(client, ids)}/{n} running; "
                                 f"see {tmp / 'core.log'}")
            time.sleep(0.2)
        result["start_s"] = time.perf_counter() - t0

        time.sleep(2)  # let the start-up burst settle
        st0, c0, w0 = status(core.pid), cpu_seconds(core.pid), time.monotonic()
        time.sleep(opts.window)
        c1, w1, st1 = cpu_seconds(core.pid), time.monotonic(), status(core.pid)
        result["cpu_pct"] = 100 * (c1 - c0) / (w1 - w0)
        result["rss_mb"] = int(st1["VmRSS"].split()[0]) / 1024
        result["idle_rss_mb"] = idle_rss / 1024
        result["threads"] = int(st1["Threads"])
        result["fds"] = len(os.listdir(f"/proc/{core.pid}/fd"))
        result["running"] = count_running(client, ids)
        del st0

        t0 = time.perf_counter()
        for sid in ids:
            client.cancel(sid)
        records = client.wait_all(ids, timeout=300)
        result["cancel_s"] = time.perf_counter() - t0
        result["cancelled"] = sum(1 for r in records if r.state == "cancelled")
        pids = [r.get("pid") for r in records if r.get("pid")]
        time.sleep(1)
        result["left_running"] = sum(1 for p in pids if Path(f"/proc/{p}").exists())
        client.close()
        return result
    finally:
        if core is not None:
            core.terminate()
            try:
                core.wait(60)
            except subprocess.TimeoutExpired:
                core.kill()
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
        if opts.work_root is None:
            shutil.rmtree(work_root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--window", type=float, default=10.0, help="seconds of steady state measured")
    ap.add_argument("--watch-interval", type=float, default=1.0)
    ap.add_argument("--work-root", type=Path, default=None)
    ap.add_argument("--env", nargs="*", default=[], metavar="SOAF_X=V",
                    help="extra settings for the core, e.g. SOAF_FILE_POLL=0")
    opts = ap.parse_args()
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    where = opts.work_root or base
    kind = "tmpfs" if str(where).startswith("/dev/shm") else "disk"
    print(f"soaf scale: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"work root under {where} ({kind}), watch_interval={opts.watch_interval} s, "
          f"steady-state window {opts.window:g} s {' '.join(opts.env)}")
    print(f"{'services':>8} {'all running':>11} {'core CPU':>9} {'core RSS':>9} "
          f"{'(idle)':>8} {'per svc':>8} {'threads':>7} {'fds':>5} {'cancel all':>10} {'left':>4}")
    failed = False
    for n in opts.counts:
        r = measure(n, opts, base)
        per = (r["rss_mb"] - r["idle_rss_mb"]) * 1024 / n
        print(f"{n:>8} {r['start_s']:>10.1f}s {r['cpu_pct']:>8.1f}% {r['rss_mb']:>7.0f}MB "
              f"{r['idle_rss_mb']:>6.0f}MB {per:>6.0f}KB {r['threads']:>7.0f} {r['fds']:>5.0f} "
              f"{r['cancel_s']:>9.1f}s {r['left_running']:>4.0f}")
        failed |= r["running"] != n or r["cancelled"] != n or r["left_running"] != 0
    print("core CPU: share of one CPU over the window; per svc: (RSS - idle RSS) / services; "
          "left: programs still alive 1 s after every service was final")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
