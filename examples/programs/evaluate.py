#!/usr/bin/env python3
"""A black box that knows nothing of soaf: how far an estimate is from sqrt(TARGET).

Usage: evaluate.py [--target T] [--delay SECONDS] IN REPORT
Reads an estimate from IN and writes REPORT, a JSON object with the estimate, the
target and the error |estimate^2 - target|. Prints "progress k/2" while it works.
"""

import argparse
import json
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--target", type=float, default=2.0)
parser.add_argument("--delay", type=float, default=0.3)
parser.add_argument("input")
parser.add_argument("report")
opts = parser.parse_args()

try:
    with open(opts.input) as f:
        x = float(f.read().strip())
except (OSError, ValueError) as e:
    print(f"evaluate: cannot read an estimate from {opts.input}: {e}", file=sys.stderr)
    sys.exit(1)
for k in range(1, 3):
    time.sleep(opts.delay / 2)
    print(f"progress {k}/2", flush=True)
report = {"estimate": x, "target": opts.target, "error": abs(x * x - opts.target)}
with open(opts.report + ".tmp", "w") as out:
    json.dump(report, out)
os.replace(opts.report + ".tmp", opts.report)
print(json.dumps(report))
