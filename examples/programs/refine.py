#!/usr/bin/env python3
"""A black box that knows nothing of soaf: one Newton step towards the square root of TARGET.

Usage: refine.py [--target T] [--delay SECONDS] IN OUT
Reads an estimate from IN and writes a better one to OUT (through a temporary name,
so OUT never exists half-written). Prints "progress k/4" while it works, DELAY apart.
Exits 1 if IN is missing or not a positive number.
"""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--target", type=float, default=2.0)
parser.add_argument("--delay", type=float, default=0.5)
parser.add_argument("input")
parser.add_argument("output")
opts = parser.parse_args()

try:
    with open(opts.input) as f:
        x = float(f.read().strip())
except (OSError, ValueError) as e:
    print(f"refine: cannot read an estimate from {opts.input}: {e}", file=sys.stderr)
    sys.exit(1)
if x <= 0:
    print(f"refine: the estimate must be positive, got {x}", file=sys.stderr)
    sys.exit(1)
for k in range(1, 5):
    time.sleep(opts.delay / 4)
    print(f"progress {k}/4", flush=True)
better = (x + opts.target / x) / 2
with open(opts.output + ".tmp", "w") as out:
    out.write(f"{better!r}\n")
os.replace(opts.output + ".tmp", opts.output)
print(f"refined {x!r} -> {better!r}")
