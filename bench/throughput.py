#!/usr/bin/env python3
"""Benchmark: how fast one core runs a trivial service (`true`), end to end.

Starts a private redis-server (unix socket) and one real core process (start_core.py),
work root on tmpfs (/dev/shm) unless --work-root is given, then measures
  1. latency: submit one service, wait for its final state, repeat (p50/p95/max);
  2. throughput: submit N services as fast as one client can, wait for all;
and prints Redis commands per service (from INFO commandstats), CPU per service by process,
and the core's context switches per service (its threads' hand-overs and waits).

    .venv/bin/python bench/throughput.py [-n 2000] [--latency-runs 300] [--max-services 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from private_redis import plugin_dir  # noqa: E402

from soaf import Client, ServiceParamTemplate  # noqa: E402
from soaf.core.embedded import find_redis_server  # noqa: E402

PLUGIN = '''
from soaf import ServiceProgramTemplate, WatcherHandler

class TrueService(ServiceProgramTemplate):
    name = "true"
    def command(self):
        return ["true"]
'''


def command_counts(r: redis.Redis) -> dict[str, int]:
    """Calls per command so far (commands run inside Lua scripts included)."""
    stats = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()
            if k not in ("cmdstat_info",)}


def commands(r: redis.Redis) -> int:
    return sum(command_counts(r).values())


def redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def process_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the process itself, of its children: the reaped ones, and the live
    ones with theirs, such as the core's spawner, the parent of its programs), from /proc."""
    own, reaped = _stat_cpu(pid)
    for child in _children(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            reaped += sum(_stat_cpu(child))
    return own, reaped


def _stat_cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return ((int(fields[11]) + int(fields[12])) / tick,
            (int(fields[13]) + int(fields[14])) / tick)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def switches(pid: int) -> int:
    """Context switches (voluntary and not) of the threads of ``pid`` alive now: a service's
    hand-overs between the core's threads, and its waits, each cost one or two. A thread
    that ended takes its count with it; the core keeps its run threads idle for a while,
    so a bench misses few."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError, ValueError):
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
    return total


def breakdown(before: dict[str, int], after: dict[str, int], n: int) -> str:
    per = {k: (after.get(k, 0) - before.get(k, 0)) / n for k in after}
    top = sorted(((v, k) for k, v in per.items() if v >= 0.05), reverse=True)
    return ", ".join(f"{k} {v:.1f}" for v, k in top)


#: The stages of one service's latency: each ends at the record field named (the client's
#: clock before the submit and after the wait bound the first and the last), so the
#: core's share and the client's can be told apart. Core and client share one clock here.
STAGES = (("submit", "submitted_at"), ("claim", "building_at"), ("prepare", "preparing_at"),
          ("spawn", "running_at"), ("run", "exited_at"), ("finish", "finished_at"),
          ("seen", None))


def stage_times(rec: Any, start: float, seen: float) -> dict[str, float]:
    """Milliseconds each of STAGES took for one service (a stage whose end the record
    lacks is left out, and the next one counts from the last end known)."""
    out, last = {}, start
    for name, field in STAGES:
        end = seen if field is None else rec.get(field)
        if isinstance(end, (int, float)):
            out[name] = (end - last) * 1000
            last = end
    return out


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=2000, help="services in the throughput run")
    ap.add_argument("--latency-runs", type=int, default=300)
    ap.add_argument("--max-services", type=int, default=64)
    ap.add_argument("--work-root", type=Path, default=None)
    ap.add_argument("--file-poll", default="0.05", help="SOAF_FILE_POLL for the core")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--breakdown", action="store_true",
                    help="print Redis commands per service by command")
    opts = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="soaf-bench-", dir="/tmp"))
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work_root = opts.work_root or Path(tempfile.mkdtemp(prefix="soaf-bench-work-", dir=base))
    plugins = plugin_dir(tmp, "bench", PLUGIN)
    sock = tmp / "redis.sock"
    server = subprocess.Popen([find_redis_server(), "--port", "0", "--unixsocket", str(sock),
                               "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                              stdout=subprocess.DEVNULL)
    url = f"unix://{sock}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOAF_")}
    env.update(SOAF_REDIS_URL=url, SOAF_SECRET="bench-secret", SOAF_PLUGINS=str(plugins),
               SOAF_WORK_ROOT=str(work_root), SOAF_NODE="bench",
               SOAF_MAX_SERVICES=str(opts.max_services), SOAF_FILE_POLL=opts.file_poll)
    core = None
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        r = redis.Redis(unix_socket_path=str(sock))
        core_log = open(tmp / "core.log", "wb")  # noqa: SIM115
        core = subprocess.Popen([sys.executable, str(ROOT / "start_core.py"), "-q"], env=env,
                                cwd=str(ROOT), stdout=core_log, stderr=subprocess.STDOUT)
        client = Client(url, secret="bench-secret")
        # warm up (and wait for the core to be ready)
        deadline = time.monotonic() + 30
        sid = client.submit(ServiceParamTemplate("true"))
        client.wait(sid, timeout=max(1, deadline - time.monotonic()))
        for _ in range(50):
            client.submit(ServiceParamTemplate("true"))
        time.sleep(1)

        print(f"soaf {sys.version.split()[0]}, work root {work_root} "
              f"({'tmpfs' if str(work_root).startswith('/dev/shm') else 'disk'}), "
              f"max_services={opts.max_services}, file_poll={opts.file_poll}")
        lat = []
        stages: dict[str, list[float]] = {name: [] for name, _ in STAGES}
        seq_before = command_counts(r)
        for _ in range(opts.latency_runs):
            t0, wall0 = time.perf_counter(), time.time()
            sid = client.submit(ServiceParamTemplate("true"))
            rec = client.wait(sid, timeout=30)
            lat.append((time.perf_counter() - t0) * 1000)
            assert rec.state == "succeeded", rec
            for name, took in stage_times(rec, wall0, time.time()).items():
                stages[name].append(took)
        print(f"latency submit->final ({opts.latency_runs} sequential): "
              f"p50 {statistics.median(lat):.2f} ms, p95 {pct(lat, 95):.2f} ms, "
              f"max {max(lat):.2f} ms")
        print("  by stage (p50 ms): " + ", ".join(
            f"{name} {statistics.median(v):.2f}" for name, v in stages.items() if v))
        seq_after = command_counts(r)
        seq_total = sum(seq_after.values()) - sum(seq_before.values())
        print(f"  redis commands per sequential submit + wait: {seq_total / opts.latency_runs:.1f}")
        if opts.breakdown:
            print(f"    by command: {breakdown(seq_before, seq_after, opts.latency_runs)}")

        before = command_counts(r)
        cpu_before, redis_before = process_cpu(core.pid), redis_cpu(r)
        switches_before = switches(core.pid)
        client_before = time.process_time()
        ids = []
        t0 = time.perf_counter()
        for _ in range(opts.n):
            ids.append(client.submit(ServiceParamTemplate("true")))
        t_submit = time.perf_counter() - t0
        records = client.wait_all(ids, timeout=600)
        elapsed = time.perf_counter() - t0
        after = command_counts(r)
        cpu_after, redis_after = process_cpu(core.pid), redis_cpu(r)
        core_switches = (switches(core.pid) - switches_before) / opts.n
        client_cpu = time.process_time() - client_before
        bad = [x for x in records if x.state != "succeeded"]
        e2e = [(x.get("finished_at") - x.get("submitted_at")) * 1000 for x in records]
        print(f"throughput: {opts.n} services in {elapsed:.2f} s = {opts.n / elapsed:.0f}/s "
              f"(submitting took {t_submit:.2f} s = {opts.n / t_submit:.0f}/s), "
              f"{len(bad)} not succeeded")
        print(f"  submit->final under load: p50 {statistics.median(e2e):.1f} ms, "
              f"p95 {pct(e2e, 95):.1f} ms")
        total = sum(after.values()) - sum(before.values())
        print(f"  redis commands per service (client+core, incl. waiting): "
              f"{total / opts.n:.1f}")
        if opts.breakdown:
            print(f"    by command: {breakdown(before, after, opts.n)}")
        own, children = (a - b for a, b in zip(cpu_after, cpu_before))
        print(f"  CPU per service: core {own / opts.n * 1000:.2f} ms, its spawner and programs "
              f"{children / opts.n * 1000:.2f} ms, redis-server "
              f"{(redis_after - redis_before) / opts.n * 1000:.2f} ms, client "
              f"{client_cpu / opts.n * 1000:.2f} ms")
        print(f"  context switches per service in the core: {core_switches:.1f}")
        if opts.json is not None:
            opts.json.write_text(json.dumps({
                "services_per_s": opts.n / elapsed, "submit_per_s": opts.n / t_submit,
                "latency_p50_ms": statistics.median(lat), "latency_p95_ms": pct(lat, 95),
                "latency_stages_p50_ms": {k: statistics.median(v) for k, v in stages.items() if v},
                "loaded_p50_ms": statistics.median(e2e),
                "redis_cmds_per_service": total / opts.n,
                "redis_cmds_per_sequential_wait": seq_total / opts.latency_runs,
                "core_cpu_ms": own / opts.n * 1000, "programs_cpu_ms": children / opts.n * 1000,
                "redis_cpu_ms": (redis_after - redis_before) / opts.n * 1000,
                "client_cpu_ms": client_cpu / opts.n * 1000,
                "core_switches_per_service": core_switches,
                "work_root": "disk" if opts.work_root is not None and
                not str(opts.work_root).startswith("/dev/shm") else "tmpfs",
                "not_succeeded": len(bad)}, indent=1))
        client.close()
        return 0 if not bad else 1
    finally:
        if core is not None:
            core.terminate()
            core.wait(30)
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
        if opts.work_root is None:
            shutil.rmtree(work_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
