#!/usr/bin/env python3
"""soaf beside its peers, measured in one go on this machine: the ratio that counts.

Runs the peers' bench (Celery prefork x2 and RQ, ``../shared/anchors/run.sh``: ~3 min)
unless ``--peers-json DIR`` names the output of a run just made, then soaf's own
(``bench/throughput.py``, ``--reps`` times, a fresh core each time) right after, and
prints both side by side with soaf's throughput as a multiple of Celery's. Absolute
numbers of different runs are not comparable on a shared machine; ratios of one run are.
A shared machine's speed also drifts within minutes: ``--rounds K`` measures peers then
soaf K times over and prints each round's ratio, then the medians (~2 min a round).

    .venv/bin/python bench/compare.py [--reps 3] [-n 1000] [--rounds 3] [--work-root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = ROOT.parent / "shared" / "anchors" / "run.sh"


def peers(out: Path | None, anchors: Path) -> dict[str, dict[str, float]]:
    """The median numbers of each peer, from a run of the anchors (made now if not given)."""
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="soaf-peers-"))
        print(f"running the peers' bench ({anchors}), about 3 minutes ...", flush=True)
        subprocess.run(["bash", str(anchors)], check=True, env={**os.environ, "OUT": str(out)},
                       stdout=subprocess.DEVNULL)
    found = {}
    for name in ("celery", "rq"):
        data = json.loads((out / f"{name}.json").read_text())
        for config, value in data["configs"].items():
            found[f"{name} {config}"] = value["median"]
    return found


def soaf(reps: int, n: int, work_root: Path | None) -> dict[str, float]:
    """The median of ``reps`` runs of bench/throughput.py, number by number."""
    runs = []
    for i in range(reps):
        out = Path(tempfile.mkstemp(prefix="soaf-bench-", suffix=".json")[1])
        argv = [sys.executable, str(ROOT / "bench" / "throughput.py"), "-n", str(n),
                "--latency-runs", "200", "--json", str(out)]
        if work_root is not None:
            argv += ["--work-root", str(work_root)]
        print(f"soaf run {i + 1}/{reps} ...", flush=True)
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        runs.append(json.loads(out.read_text()))
        out.unlink()
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]
            if isinstance(runs[0][k], (int, float))}


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Number by number, the median of several runs' numbers."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]
            if isinstance(runs[0][k], (int, float))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="soaf runs (the median counts)")
    ap.add_argument("-n", type=int, default=1000, help="services per soaf run")
    ap.add_argument("--work-root", type=Path, default=None,
                    help="soaf's work dirs here (default: tmpfs)")
    ap.add_argument("--peers-json", type=Path, default=None,
                    help="the OUT dir of an anchors run just made (else one is made now)")
    ap.add_argument("--anchors", type=Path, default=ANCHORS, help="the peers' run.sh")
    ap.add_argument("--rounds", type=int, default=1,
                    help="peers then soaf, this many times (the medians count)")
    opts = ap.parse_args()
    if opts.peers_json is None and not opts.anchors.exists():
        ap.error(f"{opts.anchors} not found: give --anchors or --peers-json")
    if opts.rounds < 1 or (opts.rounds > 1 and opts.peers_json is not None):
        ap.error("--rounds must be at least 1, and 1 with --peers-json")
    rounds = []
    for k in range(opts.rounds):
        if opts.rounds > 1:
            print(f"round {k + 1}/{opts.rounds}", flush=True)
        rounds.append((peers(opts.peers_json, opts.anchors), soaf(opts.reps, opts.n,
                                                                  opts.work_root)))
    them = {name: medians([r[0][name] for r in rounds]) for name in rounds[0][0]}
    us = medians([r[1] for r in rounds])
    celery = them.get("celery prefork2", {}).get("jobs_per_s")
    if celery and opts.rounds > 1:
        ratios = [u["services_per_s"] / t["celery prefork2"]["jobs_per_s"] for t, u in rounds]
        print("\nsoaf / Celery prefork x2 by round: "
              + ", ".join(f"{u['services_per_s']:.0f}/{t['celery prefork2']['jobs_per_s']:.0f}"
                          f" = {x:.2f}x" for (t, u), x in zip(rounds, ratios))
              + f"; median {statistics.median(ratios):.2f}x")
    print(f"\n{'system':<18}{'services/s':>11}{'p50 ms':>9}{'cmds/svc':>10}{'worker CPU ms':>15}")
    print(f"{'soaf':<18}{us['services_per_s']:>11.0f}{us['latency_p50_ms']:>9.2f}"
          f"{us['redis_cmds_per_service']:>10.1f}{us['core_cpu_ms']:>15.2f}")
    for name, m in them.items():
        print(f"{name:<18}{m['jobs_per_s']:>11.0f}{m['done_p50_ms']:>9.2f}"
              f"{m['redis_cmds_per_job']:>10.1f}{m['worker_cpu_ms_per_job']:>15.2f}")
    if celery:
        print(f"\nsoaf / Celery prefork x2 throughput: {us['services_per_s'] / celery:.2f}x "
              f"(goal 2x{'; medians of the rounds' if opts.rounds > 1 else ''})")
    print(f"soaf per service: core CPU {us['core_cpu_ms']:.2f} ms (aim 0.8), spawner and "
          f"programs {us['programs_cpu_ms']:.2f} ms, redis-server {us['redis_cpu_ms']:.2f} ms, "
          f"client {us['client_cpu_ms']:.2f} ms; one sequential submit + wait "
          f"{us['redis_cmds_per_sequential_wait']:.1f} Redis commands; work root "
          f"{'disk' if opts.work_root else 'tmpfs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
