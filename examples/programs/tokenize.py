#!/usr/bin/env python3
"""A black box that knows nothing of soaf: split a text into words, one per line.

Usage: tokenize.py [--delay SECONDS] IN OUT
Writes the lower-cased words of IN to OUT, one per line (through a temporary name).
Works in 5 slices, DELAY apart, printing "progress k/5". Exits 1 if IN is missing.
"""

import argparse
import os
import re
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--delay", type=float, default=1.0)
parser.add_argument("input")
parser.add_argument("output")
opts = parser.parse_args()

try:
    with open(opts.input, encoding="utf-8", errors="replace") as f:
        text = f.read()
except OSError as e:
    print(f"tokenize: {e}", file=sys.stderr)
    sys.exit(1)
words = re.findall(r"[a-z0-9']+", text.lower())
for k in range(1, 6):
    time.sleep(opts.delay / 5)
    print(f"progress {k}/5", flush=True)
with open(opts.output + ".tmp", "w") as out:
    out.write("".join(w + "\n" for w in words))
os.replace(opts.output + ".tmp", opts.output)
print(f"{len(words)} words")
