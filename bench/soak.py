#!/usr/bin/env python3
"""Soak test: hundreds of services while cores and Redis are killed at random.

    python bench/soak.py                       # 300 services, 3 cores, ~2 minutes
    python bench/soak.py --services 600 --cores 4 --seed 7

It starts its own redis-server (append-only file, unix socket) and ``--cores`` real core
processes, submits ``--services`` services (each runs 0.2-3 s under an exclusive lock
named after its id, so two runs of one service at once are caught) with ``retries=3``,
and meanwhile, every few seconds, does one of: ``kill -9`` a core (restarted, same node
name, after 0-6 s: before or after its 3 s heartbeat TTL), stop Redis (SIGTERM) for 1-5 s,
``kill -9`` Redis for 1-5 s. Then
it lets everything finish and checks that every submitted id has exactly one final
state (in its record and in its event stream), that no service ran twice at once, and
that no program is left running. It prints the figures and exits 1 if a check failed.
Work dirs are on /dev/shm (tmpfs) when it exists.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import soaf  # noqa: E402
from soaf.core.embedded import find_redis_server  # noqa: E402
from soaf.errors import DuplicateService, RedisUnavailable  # noqa: E402
from soaf.protocol.state import FINAL_VALUES  # noqa: E402

SECRET = "soak-secret-" + "s" * 24

PROGRAM = '''
import fcntl, os, sys, time
seconds, lockdir, sid = float(sys.argv[1]), sys.argv[2], sys.argv[3]
lock = open(os.path.join(lockdir, sid + ".lock"), "w")
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    with open(os.path.join(lockdir, "overlaps"), "a") as f:
        f.write(sid + "\\n")
    sys.exit(75)
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    time.sleep(min(0.25, max(0.0, end - time.monotonic())))
    n += 1
    open(f"part{n}.txt", "w").write(str(n))
print("done", sid)
'''

SERVICE = '''
import sys
from soaf import ServiceProgramTemplate

class Soak(ServiceProgramTemplate):
    name = "soak"
    program = "soak_program.py"

    def command(self):
        a = self.template.args
        return [sys.executable, "soak_program.py", str(a["seconds"]), a["lockdir"],
                self.template.service_id]
'''

HANDLER = '''
import os
from soaf import WatcherHandler

class SoakHandler(WatcherHandler):
    service = "soak"

    def file_change_callback(self, service, files):
        service.progress = min(1.0, len([f for f in files if f.startswith("part")]) /
                               max(1.0, service.template.args["seconds"] * 4))

    def after_watch_callback(self, service, files):
        with open(os.path.join(service.template.args["lockdir"], "collected"), "a") as f:
            f.write(f"{service.service_id} {service.attempt}\\n")
'''


class Redis:
    """The soak's redis-server: stopped, killed and restarted on the same socket."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.sock = directory / "redis.sock"
        self.url = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [find_redis_server(), "--port", "0", "--unixsocket", str(self.sock),
             "--unixsocketperm", "700", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=str(self.sock))
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def down(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


class Core:
    def __init__(self, node: str, env: dict[str, str], logs: Path) -> None:
        self.node, self.env, self.logs = node, {**env, "SOAF_NODE": node}, logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.logs / f"{self.node}.log", "ab") as out:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "start_core.py")],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, default=300)
    p.add_argument("--cores", type=int, default=3)
    p.add_argument("--slots", type=int, default=8, help="services per core")
    p.add_argument("--rate", type=float, default=6.0, help="submissions per second")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait at the end")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args()
    rng = random.Random(args.seed)

    base = Path(tempfile.mkdtemp(prefix="soaf-soak-", dir="/tmp"))
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="soaf-soak-work-",
                                 dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else base))
    plugins, lockdir, logs = base / "plugins", base / "locks", base / "logs"
    for d in (plugins / "services", plugins / "handlers", lockdir, logs):
        d.mkdir(parents=True)
    for package, text in (("services", SERVICE), ("handlers", HANDLER)):
        (plugins / package / "__init__.py").write_text("")
        (plugins / package / "soak.py").write_text(textwrap.dedent(text))
    (plugins / "soak_program.py").write_text(PROGRAM)

    server = Redis(base)
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOAF_")}
    env.update(SOAF_REDIS_URL=server.url, SOAF_SECRET=SECRET, SOAF_PREFIX="soak",
               SOAF_WORK_ROOT=str(work), SOAF_PLUGINS=str(plugins),
               SOAF_MAX_SERVICES=str(args.slots), SOAF_HEARTBEAT_INTERVAL="0.5",
               SOAF_HEARTBEAT_TTL="3", SOAF_KILL_GRACE="1", PYTHONUNBUFFERED="1")
    cores = [Core(f"soak-{i + 1}", env, logs) for i in range(args.cores)]
    for core in cores:
        core.start()
    client = soaf.Client(server.url, secret=SECRET, prefix="soak", reconnect_for=120)

    kills: collections.Counter[str] = collections.Counter()
    submitted: list[str] = []
    stop_chaos = threading.Event()

    def chaos() -> None:
        while not stop_chaos.wait(rng.uniform(2.0, 6.0)):
            action = rng.choice(["core", "core", "core", "redis-stop", "redis-kill"])
            if action == "core":
                core = rng.choice(cores)
                if core.alive():
                    core.kill()
                    kills["core kill -9"] += 1
                    # Back before its heartbeat expires (it re-adopts), or after (taken over).
                    stop_chaos.wait(rng.uniform(0.0, 6.0))
                    core.start()
            else:
                server.down(signal.SIGTERM if action == "redis-stop" else signal.SIGKILL)
                kills["redis " + ("stop" if action == "redis-stop" else "kill -9")] += 1
                time.sleep(rng.uniform(1.0, 5.0))
                server.start()

    started = time.monotonic()
    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()
    resubmits = 0
    for i in range(args.services):
        template = soaf.ServiceParamTemplate(
            "soak", service_id=f"soak-{i:05d}", retries=3, watch_interval=0.3,
            args={"seconds": round(rng.uniform(0.2, 3.0), 2), "lockdir": str(lockdir)})
        while True:
            try:
                client.submit(template)
                break
            except DuplicateService:
                break  # an earlier try went through before the connection broke
            except RedisUnavailable:
                resubmits += 1
                time.sleep(0.5)
        submitted.append(template.service_id)
        time.sleep(1.0 / args.rate)
    # Keep the chaos going while the tail of the work runs, then let it settle.
    time.sleep(10)
    stop_chaos.set()
    chaos_thread.join()
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    for core in cores:
        if not core.alive():
            core.start()
    records = client.wait_all(submitted, timeout=args.timeout)
    duration = time.monotonic() - started

    # -- checks ------------------------------------------------------------------------
    problems: list[str] = []
    states: collections.Counter[str] = collections.Counter()
    attempts: collections.Counter[int] = collections.Counter()
    lost_events = 0
    recovered: collections.Counter[str] = collections.Counter()
    for record in records:
        states[record.state] += 1
        attempts[record.attempt] += 1
        if record.get("recovered_as"):
            recovered[record.get("recovered_as")] += 1
        events = list(client.events(record.service_id, follow=False))
        finals = [e for e in events if e.get("state") in FINAL_VALUES]
        if len(finals) != 1 or not record.final:
            problems.append(f"{record.service_id}: {len(finals)} final events, "
                            f"record {record.state}")
        seqs = [e["seq"] for e in events]
        if seqs != sorted(set(seqs)):
            problems.append(f"{record.service_id}: seq not strictly increasing")
        lost_events += sum(1 for e in events if e.get("state") == "lost")
    overlaps = (lockdir / "overlaps").read_text().split() if (lockdir / "overlaps").exists() else []
    if overlaps:
        problems.append(f"ran twice at once: {sorted(set(overlaps))[:10]}")
    collected = collections.Counter(
        line.split()[0] for line in (lockdir / "collected").read_text().splitlines())
    twice = [sid for sid, n in collected.items() if n > 1]

    client.close()
    for core in cores:
        if core.alive():
            assert core.proc is not None
            core.proc.send_signal(signal.SIGTERM)
    for core in cores:
        if core.proc is not None:
            try:
                core.proc.wait(60)
            except subprocess.TimeoutExpired:
                core.kill()
    marker = str(lockdir).encode()
    orphans = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            orphans.append(int(pid))
    if orphans:
        problems.append(f"programs left running: {orphans}")
    server.down(signal.SIGTERM)

    if twice:
        problems.append(f"after_watch_callback ran more than once for {twice[:10]}")
    one_final = not [p for p in problems if "final" in p and "after_watch" not in p]
    reruns = sum((n - 1) * c for n, c in attempts.items())
    print(f"submitted      {len(submitted)}  (submit retried during outages: {resubmits})")
    print(f"final          {sum(states.values())}  "
          + ", ".join(f"{s} {n}" for s, n in sorted(states.items())))
    print(f"one final each {'yes' if one_final else 'NO'}")
    print("attempts       " + ", ".join(f"{n}: {c} ids" for n, c in sorted(attempts.items())))
    print(f"re-runs        {reruns}  (lost events {lost_events})")
    print("no re-run      finished by the restarted core: "
          + (", ".join(f"{k} {n}" for k, n in sorted(recovered.items())) or "none"))
    print(f"after_watch    once per collected id: {'yes' if not twice else 'NO'} "
          f"({sum(collected.values())} calls)")
    print(f"duration       {duration:.1f} s")
    print("kills          " + ", ".join(f"{k} {n}" for k, n in sorted(kills.items()))
          + f"  (core starts {sum(c.starts for c in cores)})")
    print(f"overlaps       {len(overlaps)}   orphans left {len(orphans)}")
    print(f"logs           {logs}")
    for problem in problems[:20]:
        print("PROBLEM:", problem)
    if not args.keep and not problems:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
