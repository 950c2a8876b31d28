#!/usr/bin/env python3
"""Benchmark: what a client's waiting costs Redis, with no core at all.

A private redis-server holds N submitted services (``Client.submit``, no core offers
them); a finisher process then ends them as a core would, with soaf's own RECORD script
(final record, event and note on the notify channel), at ``--rate`` services a second,
while one client waits on all N ids with ``wait_all`` (then again with ``as_completed``).
The same finishing is first run with nobody waiting, so what the wait adds is the
difference. Printed per finished service: Redis commands (INFO commandstats, commands run
inside Lua included) in all and by command, wall time, how long after the last finish the
wait returned, and the waiting client's CPU. Then the cost of a single sequential wait:
submit one service, wait for it while a thread ends it a moment later, repeat.

    .venv/bin/python bench/wait.py [-n 10000] [--rate 2000] [--runs 200]
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.private_redis import private_redis  # noqa: E402
from soaf import Client, ServiceParamTemplate  # noqa: E402
from soaf.protocol.keys import Keys  # noqa: E402
from soaf.protocol.scripts import RECORD  # noqa: E402
from soaf.protocol.state import Change, record_call  # noqa: E402

SECRET = "bench-secret-" + "x" * 20
PREFIX = "wbench"
#: The changes a simulated core writes after the claim, one RECORD call (and note) each.
STEPS = ("preparing", "running", "succeeded")


def counts(r: redis.Redis) -> dict[str, int]:
    """Calls per command so far (commands run inside Lua included; INFO left out)."""
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()
            if k != "cmdstat_info"}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def shown(per: dict[str, float]) -> str:
    top = sorted(((v, k) for k, v in per.items() if abs(v) >= 0.005), reverse=True)
    return ", ".join(f"{k} {v:.2f}" for v, k in top) or "-"


def finish(r: redis.Redis, keys: Keys, ids: list[str], states: tuple[str, ...] = STEPS,
           seq: int = 2) -> None:
    """Write ``states`` (from ``seq`` on) of ``ids`` as a core's state writer does: one
    RECORD call per change (an event and a note each), in one pipeline."""
    pipe = r.pipeline(transaction=False)
    for sid in ids:
        for i, state in enumerate(states):
            now = time.time()
            values: dict[str, object] = {"state": state, f"{state}_at": now}
            if state == "succeeded":
                values.update(finished_at=now, exit_code=0)
            RECORD.call(pipe, *record_call(keys, [Change(sid, 1, seq + i, values, ts=now)]))
    pipe.execute()


def finisher(sock: str, ids: list[str], rate: float, batch: int, last: Any) -> None:
    """The simulated cores (a process of its own, so its CPU is not the client's); sets
    ``last`` to the time.time() of the last finish."""
    r = redis.Redis(unix_socket_path=sock)
    RECORD.load(r)
    keys, start = Keys(PREFIX), time.monotonic()
    for i in range(0, len(ids), batch):
        ahead = start + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        finish(r, keys, ids[i:i + batch])
    last.value = time.time()


def submit(client: Client, n: int) -> list[str]:
    return [client.submit(ServiceParamTemplate("bench")) for _ in range(n)]


def run_finisher(sock: str, ids: list[str], opts: argparse.Namespace) -> float:
    """Run the finisher to its end; the time.time() of its last finish."""
    ctx = multiprocessing.get_context("spawn")
    last = ctx.Value("d", 0.0)
    proc = ctx.Process(target=finisher, args=(sock, ids, opts.rate, opts.batch, last))
    proc.start()
    proc.join()
    return float(last.value)


def many(how: str, client: Client, r: redis.Redis, sock: str, opts: argparse.Namespace,
         base: dict[str, float]) -> None:
    """Wait on ``opts.n`` ids with ``how`` while the finisher ends them."""
    ids = submit(client, opts.n)
    ended: list[float] = []
    t_end = threading.Thread(target=lambda: ended.append(run_finisher(sock, ids, opts)))
    before, cpu0 = counts(r), resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    t_end.start()
    if how == "wait_all":
        records = client.wait_all(ids, timeout=600)
    else:
        records = list(client.as_completed(ids, timeout=600))
    t1, returned = time.monotonic(), time.time()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    t_end.join()
    spent = delta(before, counts(r))
    assert len(records) == opts.n and all(x.state == "succeeded" for x in records)
    per = {k: v / opts.n for k, v in spent.items()}
    own = {k: per.get(k, 0.0) - base.get(k, 0.0) for k in set(per) | set(base)}
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    print(f"{how} on {opts.n} ids: {t1 - t0:.2f} s, returned {returned - ended[0]:.3f} s after the "
          f"last finish; client CPU {cpu:.2f} s = {cpu / opts.n * 1e6:.0f} us per service")
    print(f"  redis commands per finished service: {sum(per.values()):.2f} in all, "
          f"{sum(own.values()):.2f} for the wait")
    print(f"    the wait's, by command: {shown(own)}")


def single(client: Client, r: redis.Redis, opts: argparse.Namespace) -> None:
    """Sequential: submit one, wait while a thread takes it through its states, one write
    each, ending it ``--delay`` s later; and the same loop without waiting (the thread
    signals the end), so the difference is the wait."""
    keys, todo, done = Keys(PREFIX), queue.Queue[str](), queue.Queue[str]()

    def ender() -> None:
        while (sid := todo.get()) != "":
            for i, state in enumerate(("building", *STEPS)):  # each in its own write
                time.sleep(opts.delay / (1 + len(STEPS)))
                finish(r, keys, [sid], (state,), seq=2 + i)
            done.put(sid)

    thread = threading.Thread(target=ender, daemon=True)
    thread.start()
    RECORD.load(r)
    spent: dict[str, dict[str, int]] = {}
    for mode in ("no wait", "wait", "no wait again", "wait on a final one"):
        before = counts(r)
        for _ in range(opts.runs):
            sid = client.submit(ServiceParamTemplate("bench"))
            todo.put(sid)
            if mode == "wait":
                assert client.wait(sid, timeout=30).state == "succeeded"
            done.get()
            if mode == "wait on a final one":
                assert client.wait(sid, timeout=30).state == "succeeded"
        spent[mode] = delta(before, counts(r))
    todo.put("")
    base = {k: (spent["no wait"].get(k, 0) + spent["no wait again"].get(k, 0)) / 2 / opts.runs
            for k in set(spent["no wait"]) | set(spent["no wait again"])}
    for mode in ("wait", "wait on a final one"):
        per = {k: v / opts.runs for k, v in spent[mode].items()}
        own = {k: per.get(k, 0.0) - base.get(k, 0.0) for k in set(per) | set(base)}
        print(f"single sequential {mode} ({opts.runs} runs, ended {opts.delay * 1000:g} ms "
              f"after submit): {sum(own.values()):.2f} redis commands for the wait "
              f"({sum(per.values()):.2f} with submit and finish)")
        print(f"    by command: {shown(own)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=10000, help="services waited on at once")
    ap.add_argument("--rate", type=float, default=2000.0, help="services finished a second")
    ap.add_argument("--batch", type=int, default=50, help="RECORD calls per pipeline")
    ap.add_argument("--runs", type=int, default=200, help="single sequential waits")
    ap.add_argument("--delay", type=float, default=0.004,
                    help="seconds between a single submit and its end")
    opts = ap.parse_args()
    with private_redis("soaf-bench-wait-") as (tmp, r):
        sock = str(tmp / "redis.sock")
        with Client(f"unix://{sock}", secret=SECRET, prefix=PREFIX) as client:
            ids = submit(client, opts.n)
            before = counts(r)
            run_finisher(sock, ids, opts)
            base = {k: v / opts.n for k, v in delta(before, counts(r)).items()}
            print(f"finishing alone (the simulated cores): {sum(base.values()):.2f} redis "
                  f"commands per service: {shown(base)}")
            many("wait_all", client, r, sock, opts, base)
            many("as_completed", client, r, sock, opts, base)
            single(client, r, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
