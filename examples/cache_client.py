"""Results reused by content: the second identical request is answered at once.

Submits the wordcount service over examples/data/*.txt with ``cache=True``, twice. The
first run counts (a few seconds); the second template asks for the same work (same
service and plugin code, args, env, output spec and input content), so the core answers
it from the first run: ``succeeded`` at once, ``cached_from`` naming that run, its
outputs and custom fields (``total_words``) reused. Change a byte of an input, an
argument or a plugin file, and it runs again.

Run it next to a running core (``.venv/bin/python start_core.py``):

    .venv/bin/python examples/cache_client.py
    .venv/bin/soaf cache ls                 # the entries; `soaf cache clear` forgets them

or in one command: ``python3 .ci/dev.py demo examples/cache_client.py``. Run it again
and both are answered from the cache (it lives in Redis, beyond this script);
``soaf cache clear wordcount`` starts over.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from soaf import Client, ServiceParamTemplate

DATA = Path(__file__).resolve().parent / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay", type=float, default=0.5, help="seconds per file")
    opts = parser.parse_args()
    inputs = [str(p) for p in sorted(DATA.glob("*.txt"))]
    with Client() as client:
        for round_ in ("first", "second"):
            job = ServiceParamTemplate("wordcount", input_files=inputs, output_files=["total.txt"],
                                       args={"delay": opts.delay}, watch_interval=0.2, cache=True)
            started = time.monotonic()
            record = client.wait(client.submit(job), timeout=300)
            took = time.monotonic() - started
            source = (f"answered from the cache by {record.get('cached_from')}"
                      if record.get("cached_from") else "ran")
            print(f"{round_}: {record.service_id} {record.state} in {took:.2f} s, {source}; "
                  f"{record.fields.get('total_words')} words", flush=True)
            if not record.ok:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
