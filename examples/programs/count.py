#!/usr/bin/env python3
"""A black box that knows nothing of soaf: count how often each word occurs.

Usage: count.py [--delay SECONDS] IN OUT
Reads one word per line from IN and writes OUT, a JSON object word -> count. Prints
"progress k/4" while it works. Exits 1 if IN is missing.
"""

import argparse
import collections
import json
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--delay", type=float, default=0.5)
parser.add_argument("input")
parser.add_argument("output")
opts = parser.parse_args()

try:
    with open(opts.input, encoding="utf-8") as f:
        counts = collections.Counter(line.strip() for line in f if line.strip())
except OSError as e:
    print(f"count: {e}", file=sys.stderr)
    sys.exit(1)
for k in range(1, 5):
    time.sleep(opts.delay / 4)
    print(f"progress {k}/4", flush=True)
with open(opts.output + ".tmp", "w") as out:
    json.dump(dict(sorted(counts.items())), out)
os.replace(opts.output + ".tmp", opts.output)
print(f"{len(counts)} distinct words")
