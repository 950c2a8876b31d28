"""Progress without code: a service whose progress (and ETA) the core measures itself.

``services/chunks.py`` declares ``progress = probes.files("out/chunk_*.json",
total=lambda t: t.args["chunks"])`` and has no handler: the core counts the chunk files
as they appear. This script submits one run and prints its progress and the time left,
which the core estimates from the recent rate of the progress.

Run it next to a running core (``.venv/bin/python start_core.py``):

    .venv/bin/python examples/progress_client.py --chunks 12 --delay 0.5

or in one command: ``python3 .ci/dev.py demo examples/progress_client.py``. Meanwhile
``soaf ls`` shows the ETA column, and ``soaf wait ID`` the ETA beside the bar.
"""

from __future__ import annotations

import argparse
import sys
import time

from soaf import Client, ServiceParamTemplate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--delay", type=float, default=0.5, help="seconds per chunk")
    opts = parser.parse_args()
    job = ServiceParamTemplate("chunks", args={"chunks": opts.chunks, "delay": opts.delay},
                               output_files=["out/chunk_*.json"], watch_interval=0.2)
    with Client() as client:
        sid = client.submit(job)
        print(f"submitted chunks as {sid}", flush=True)
        for event in client.events(sid, timeout=600):
            if "progress" in event:
                eta = event.get("eta")
                left = (f", about {max(0.0, eta - time.time()):.1f} s left"
                        if eta and event["progress"] < 1 else "")
                print(f"  progress {event['progress']:.0%}{left}", flush=True)
            if "state" in event:
                print(f"  state {event['state']}", flush=True)
        record = client.status(sid)
    print(f"{record.state}: {len(record.outputs)} chunks written")
    return 0 if record.ok else 1


if __name__ == "__main__":
    sys.exit(main())
