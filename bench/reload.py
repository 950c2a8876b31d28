"""Benchmark: plugin save-to-active latency, and whether reloads stall running services.

Starts a private redis-server and a real core (``start_core.py``) at default reload
settings, starts one long service whose handler records the time of every
``file_change_callback`` (``watch_interval`` 0.05 s), then rewrites a plugin file many
times. For each save it measures the time from just before the write until
``Client.plugins()`` (the ``plugins`` hash in Redis) shows the new version. At the end
it compares the callback gaps during reloads with the gaps before them.

    .venv/bin/python bench/reload.py [--reps 40] [--poll-only]

``--poll-only`` turns the file-system observer off (SOAF_RELOAD_WATCH=0), so the
periodic scan alone finds the change. The plugin dir is on the main disk (a temp dir)
unless ``--plugin-base`` says otherwise; the work root is on /dev/shm when available.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from soaf import Client, ServiceParamTemplate  # noqa: E402
from soaf.core.embedded import find_redis_server  # noqa: E402

SECRET = "bench-secret-" + "x" * 20
NODE = "bench"
INTERVAL = 0.05

SERVICE = """\
from soaf import ServiceProgramTemplate


class Ticker(ServiceProgramTemplate):
    name = "ticker"

    def command(self):
        return ["sh", "-c", "while [ ! -f release ]; do sleep 0.05; done"]
"""

HANDLER = """\
import time

from soaf import WatcherHandler


class TickerHandler(WatcherHandler):
    service = "ticker"

    def before_watch_callback(self, service):
        self.ticks = []

    def file_change_callback(self, service, files):
        self.ticks.append(time.time())

    def after_watch_callback(self, service, files):
        service.set(ticks=self.ticks)
"""

TARGET = """\
from soaf import ServiceProgramTemplate

EDIT = {n}


class Target(ServiceProgramTemplate):
    name = "target"
    edit = EDIT

    def command(self):
        return ["true"]
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(value: float) -> str:
    return f"{value * 1000:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=40, help="saves to measure")
    parser.add_argument("--poll-only", action="store_true", help="no file-system observer")
    parser.add_argument("--plugin-base", default=None, help="where to create the plugin dir")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="soaf-bench-", dir="/tmp"))
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="soaf-bench-work-",
                                 dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
    plugins = Path(tempfile.mkdtemp(prefix="soaf-bench-plugins-", dir=args.plugin_base))
    for package in ("services", "handlers"):
        (plugins / package).mkdir()
        (plugins / package / "__init__.py").write_text("")
    (plugins / "services" / "ticker.py").write_text(SERVICE)
    (plugins / "handlers" / "ticker.py").write_text(HANDLER)
    target = plugins / "services" / "target.py"
    target.write_text(TARGET.format(n=0))

    sock = tmp / "redis.sock"
    redis_proc = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--unixsocket", str(sock), "--save", "",
         "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOAF_")}
    env.update({"SOAF_REDIS_URL": f"unix://{sock}", "SOAF_SECRET": SECRET, "SOAF_NODE": NODE,
                "SOAF_WORK_ROOT": str(work), "SOAF_PLUGINS": str(plugins),
                "SOAF_STATE_DIR": str(tmp / "state"), "SOAF_PREFIX": "bench"})
    if args.poll_only:
        env["SOAF_RELOAD_WATCH"] = "0"
    core = None
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(tmp / "core.log", "wb") as log:
            core = subprocess.Popen([sys.executable, str(ROOT / "start_core.py")], cwd=ROOT,
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        client = Client(f"unix://{sock}", secret=SECRET, prefix="bench")

        def version() -> str | None:
            return client.plugins().get(NODE, {}).get("version")

        deadline = time.monotonic() + 30
        while version() is None:
            if time.monotonic() > deadline or core.poll() is not None:
                sys.exit(f"the core did not come up; see {tmp / 'core.log'}")
            time.sleep(0.05)

        sid = client.submit(ServiceParamTemplate("ticker", watch_interval=INTERVAL))
        while client.status(sid).state != "running":
            time.sleep(0.02)
        quiet_from = time.time()
        time.sleep(3.0)  # the baseline: callbacks without reloads
        quiet_to = time.time()

        latencies: list[float] = []
        windows: list[tuple[float, float]] = []
        current = version()
        for n in range(1, args.reps + 1):
            start_wall, start = time.time(), time.perf_counter()
            target.write_text(TARGET.format(n=n))
            limit = start + 30
            while (seen := version()) == current:
                if time.perf_counter() > limit:
                    sys.exit(f"save {n} never became active; see {tmp / 'core.log'}")
                time.sleep(0.002)
            latencies.append(time.perf_counter() - start)
            windows.append((start_wall, time.time()))
            current = seen
            time.sleep(0.3)  # a quiet spell: the control group for the callback gaps
        reloading_to = time.time()

        (Path(client.status(sid).get("work_dir")) / "release").touch()
        record = client.wait(sid, timeout=30)
        ticks: list[float] = record.fields["ticks"]
        gaps = [(b, b - a) for a, b in itertools.pairwise(ticks)]
        before = [g for t, g in gaps if quiet_from < t <= quiet_to]
        during = [g for t, g in gaps if any(lo <= t <= hi + INTERVAL for lo, hi in windows)]
        between = [g for t, g in gaps if windows[0][0] <= t <= reloading_to
                   and not any(lo <= t <= hi + INTERVAL for lo, hi in windows)]

        mode = "poll only (observer off)" if args.poll_only else "file events + poll"
        print(f"soaf plugin reload, default settings, {mode}; plugin dir {plugins}")
        print(f"save -> new version active (seen in Redis), {len(latencies)} saves:")
        print(f"  p50 {ms(statistics.median(latencies))}   p95 {ms(percentile(latencies, 0.95))}"
              f"   max {ms(max(latencies))}   min {ms(min(latencies))}")
        print(f"file_change_callback of a running service (watch_interval {INTERVAL * 1000:.0f} ms):")
        for label, values in (("before any reload", before), ("between reloads", between),
                              ("during reloads", during)):
            if values:
                print(f"  {label:18} {len(values):5d} gaps: p50 {ms(statistics.median(values))}"
                      f"   p99 {ms(percentile(values, 0.99))}   max {ms(max(values))}")
        print(json.dumps({"p50": statistics.median(latencies),
                          "p95": percentile(latencies, 0.95), "max": max(latencies),
                          "gap_max_during": max(during) if during else None}))
    finally:
        if core is not None and core.poll() is None:
            core.terminate()
            try:
                core.wait(20)
            except subprocess.TimeoutExpired:
                core.kill()
        redis_proc.terminate()
        redis_proc.wait(10)
        for path in (tmp, work, plugins):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
