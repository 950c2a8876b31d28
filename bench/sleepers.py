#!/usr/bin/env python3
"""Benchmark: what N concurrent sleeping services cost one core while they sleep.

For each count N (default 1000; ``-n 1000 5000`` for both): a private redis-server
(bench/private_redis.py) and one real core process (start_core.py, work root on tmpfs
unless --work-root is given, max_services >= N), a service whose program is
``sleep S``. It submits N, times how long until all N programs run, then samples the
core for --window seconds (default 20): CPU as a share of one core (utime+stime from
/proc/<pid>/stat), RSS (VmRSS), threads, open files, and redis-server's CPU and
commands per second. Then it cancels all N and checks every one ends cancelled with no
program left (--sleep S: the programs sleep S seconds, and every service must succeed).

Each service has the default handler (``file_change_callback`` every watch_interval,
1 s, counting its files).

    .venv/bin/python bench/sleepers.py [-n 1000 5000] [--window 20] [--env SOAF_X=V ...]
    .venv/bin/python bench/sleepers.py -n 1000 --profile 10   # py-spy, if installed
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from private_redis import plugin_dir, private_redis  # noqa: E402

from soaf import Client, ServiceParamTemplate  # noqa: E402

PLUGIN = '''
from soaf import ServiceProgramTemplate

class Sleeper(ServiceProgramTemplate):
    name = "sleeper"
    def command(self):
        return ["sleep", str(self.template.args["seconds"])]
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


def sleeping_programs(core: int) -> int:
    """How many ``sleep`` processes descend from ``core`` (its programs, running)."""
    parent: dict[int, int] = {}
    comm: dict[int, bytes] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            data = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        head, _, rest = data.rpartition(b")")
        parent[int(name)] = int(rest.split()[1])
        comm[int(name)] = head.partition(b"(")[2]
    count = 0
    for pid, name in comm.items():
        if name != b"sleep":
            continue
        p = parent.get(pid, 0)
        while p > 1 and p != core:
            p = parent.get(p, 0)
        count += p == core
    return count


def kill_programs(work_root: Path) -> None:
    """SIGKILL the groups of the programs a killed core left: those running in a work dir
    under the root (or, under the shim, naming it)."""
    root = str(work_root)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            if cwd.startswith(root + "/") or root.encode() in Path(
                    f"/proc/{name}/cmdline").read_bytes():
                os.killpg(int(name), signal.SIGKILL)
        except OSError:
            continue


def redis_stats(r) -> tuple[float, int]:
    """(CPU seconds, commands so far) of the redis-server."""
    cpu = r.info("cpu")
    calls = sum(v["calls"] for k, v in r.info("commandstats").items() if k != "cmdstat_info")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), calls


def limits_report(n: int) -> list[str]:
    """What this machine allows against what N services need (2 processes each: the
    shim and its program; one thread and about two open files in the core)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]

    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return "?"

    pids_max = read("/sys/fs/cgroup/pids.max")
    lines = [f"open files: soft {soft}, hard {hard} (the core raises its soft limit to the "
             f"hard one; it needs about 2 per service + 50: {2 * n + 50})",
             f"processes: pid_max {read('/proc/sys/kernel/pid_max')}, threads-max "
             f"{read('/proc/sys/kernel/threads-max')}, RLIMIT_NPROC "
             f"{'unlimited' if nproc == resource.RLIM_INFINITY else nproc}, cgroup pids.max "
             f"{pids_max} (N services need N processes + N core threads: {2 * n})"]
    hard_n = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if hard_n < 2 * n + 50:
        lines.append(f"WARNING: the hard open-files limit is too low for {n} services")
    return lines


def measure(n: int, opts: argparse.Namespace) -> dict[str, float]:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work_root = opts.work_root or Path(tempfile.mkdtemp(prefix="soaf-sleepers-", dir=base))
    result: dict[str, float] = {}
    with private_redis("soaf-sleepers-") as (tmp, r):
        plugins = plugin_dir(tmp, "sleeper", PLUGIN)
        url = f"unix://{tmp / 'redis.sock'}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOAF_")}
        env.update(SOAF_REDIS_URL=url, SOAF_SECRET="bench-secret", SOAF_PLUGINS=str(plugins),
                   SOAF_WORK_ROOT=str(work_root), SOAF_NODE="sleepers",
                   SOAF_MAX_SERVICES=str(n + 10))
        env.update(dict(item.split("=", 1) for item in opts.env))
        core = None
        try:
            core_log = open(tmp / "core.log", "wb")  # noqa: SIM115
            core = subprocess.Popen([sys.executable, str(ROOT / "start_core.py"), "-q"],
                                    env=env, cwd=str(ROOT), stdout=core_log,
                                    stderr=subprocess.STDOUT)
            client = Client(url, secret="bench-secret")
            warm = client.submit(ServiceParamTemplate("sleeper", args={"seconds": 0}))
            client.wait(warm, timeout=60)
            time.sleep(1)
            result["idle_rss_mb"] = int(status(core.pid)["VmRSS"].split()[0]) / 1024
            result["idle_threads"] = int(status(core.pid)["Threads"])
            result["idle_fds"] = len(os.listdir(f"/proc/{core.pid}/fd"))

            seconds = opts.sleep or 3600
            t0 = time.perf_counter()
            ids = [client.submit(ServiceParamTemplate("sleeper", args={"seconds": seconds}))
                   for _ in range(n)]
            result["submit_s"] = time.perf_counter() - t0
            while (running := sleeping_programs(core.pid)) < n:
                if core.poll() is not None or time.perf_counter() - t0 > 600:
                    raise SystemExit(f"only {running}/{n} running; see {tmp / 'core.log'}")
                time.sleep(0.2)
            result["ramp_s"] = time.perf_counter() - t0
            time.sleep(2)  # the start-up burst settles (the last records written)

            c0, w0, (rc0, calls0) = cpu_seconds(core.pid), time.monotonic(), redis_stats(r)
            rss, threads, fds = [], [], []
            while time.monotonic() - w0 < opts.window:
                time.sleep(1)
                st = status(core.pid)
                rss.append(int(st["VmRSS"].split()[0]) / 1024)
                threads.append(int(st["Threads"]))
                fds.append(len(os.listdir(f"/proc/{core.pid}/fd")))
            c1, w1, (rc1, calls1) = cpu_seconds(core.pid), time.monotonic(), redis_stats(r)
            if opts.profile:  # after the window: py-spy's own load is not in it
                subprocess.run(
                    [str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking",
                     "-p", str(core.pid), "-d", str(opts.profile), "-f", "raw", "-r", "20",
                     "-o", f"{opts.profile_out}-{n}.txt"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            if opts.sleep and time.perf_counter() - t0 > seconds:
                print(f"WARNING: the window outlasted the programs (sleep {seconds})")
            result["cpu_pct"] = 100 * (c1 - c0) / (w1 - w0)
            result["redis_cpu_pct"] = 100 * (rc1 - rc0) / (w1 - w0)
            result["redis_cmds_s"] = (calls1 - calls0) / (w1 - w0)
            result["rss_mb"] = statistics.mean(rss)
            result["rss_max_mb"] = max(rss)
            result["threads"] = max(threads)
            result["fds"] = max(fds)
            result["running_after"] = sleeping_programs(core.pid)

            t1 = time.perf_counter()
            if not opts.sleep:
                for sid in ids:
                    client.cancel(sid)
            records = client.wait_all(ids, timeout=seconds + 600)
            result["end_s"] = time.perf_counter() - t1
            result["ok"] = sum(1 for x in records
                               if x.state == ("succeeded" if opts.sleep else "cancelled"))
            time.sleep(1)
            result["left"] = sleeping_programs(core.pid)
            client.close()
        finally:
            if core is not None:
                core.terminate()
                try:
                    core.wait(60)
                except subprocess.TimeoutExpired:
                    core.kill()
                    kill_programs(work_root)
            if opts.work_root is None:
                shutil.rmtree(work_root, ignore_errors=True)
    return result


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the core on the way out
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, nargs="+", default=[1000], help="numbers of services")
    ap.add_argument("--window", type=float, default=20.0, help="seconds of sampling")
    ap.add_argument("--sleep", type=int, default=0,
                    help="seconds each program sleeps, then ends and must succeed (default: "
                         "3600, and all are cancelled after the window, and must end cancelled)")
    ap.add_argument("--work-root", type=Path, default=None)
    ap.add_argument("--env", nargs="*", default=[], metavar="SOAF_X=V",
                    help="extra settings for the core, e.g. SOAF_FILE_POLL=0")
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                    help="then record the core with py-spy (raw format) for this long")
    ap.add_argument("--profile-out", default="/tmp/sleepers-profile")
    opts = ap.parse_args()
    where = opts.work_root or Path("/dev/shm")
    kind = "tmpfs" if str(where).startswith("/dev/shm") else "disk"
    print(f"soaf sleepers: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, work root "
          f"under {where} ({kind}), window {opts.window:g} s {' '.join(opts.env)}")
    for line in limits_report(max(opts.n)):
        print("  " + line)
    print(f"{'services':>8} {'submit':>7} {'all run':>8} {'core CPU':>9} {'RSS':>7} "
          f"{'(idle)':>7} {'per svc':>8} {'threads':>7} {'fds':>6} {'redis CPU':>9} "
          f"{'cmd/s':>6} {'end all':>8} {'ok':>5} {'left':>4}")
    failed = False
    for n in opts.n:
        x = measure(n, opts)
        per = (x["rss_mb"] - x["idle_rss_mb"]) * 1024 / n
        print(f"{n:>8} {x['submit_s']:>6.1f}s {x['ramp_s']:>7.1f}s {x['cpu_pct']:>8.1f}% "
              f"{x['rss_mb']:>5.0f}MB {x['idle_rss_mb']:>5.0f}MB {per:>6.0f}KB "
              f"{x['threads']:>7.0f} {x['fds']:>6.0f} {x['redis_cpu_pct']:>8.1f}% "
              f"{x['redis_cmds_s']:>6.0f} {x['end_s']:>7.1f}s {x['ok']:>5.0f} {x['left']:>4.0f}",
              flush=True)
        failed |= x["ok"] != n or x["running_after"] != n or x["left"] != 0
        if n == 1000 and (x["cpu_pct"] > 20 or x["rss_max_mb"] > 150):
            print("  over budget at 1000: core CPU must stay <= 20% and RSS <= 150 MB")
    print("submit: one client submitting all N; all run: from the first submit until all N "
          "programs run; core CPU: share of one core over the window; RSS: mean over the "
          "window (idle: before the services); threads, fds: max over the window; redis: "
          "share of one core and commands/s over the window; end all: cancelling all (or "
          "--sleep: until all ended) until all are final; ok: cancelled (--sleep: succeeded); "
          "left: programs still running 1 s later")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
