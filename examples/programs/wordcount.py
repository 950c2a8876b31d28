#!/usr/bin/env python3
"""A black box that knows nothing of soaf: counts words, one output file per input.

Usage: wordcount.py [--delay SECONDS] FILE...
Writes counts/<FILE>.count for each input (pausing between files so progress can be
followed) and total.txt at the end. Exits 1 if an input is missing.
"""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--delay", type=float, default=1.0)
parser.add_argument("files", nargs="*")
opts = parser.parse_args()

os.makedirs("counts", exist_ok=True)
total = 0
for name in opts.files:
    try:
        with open(name, encoding="utf-8", errors="replace") as f:
            words = len(f.read().split())
    except OSError as e:
        print(f"wordcount: {e}", file=sys.stderr)
        sys.exit(1)
    time.sleep(opts.delay)
    with open(os.path.join("counts", os.path.basename(name) + ".count"), "w") as out:
        out.write(f"{words}\n")
    print(f"{name}: {words} words", flush=True)
    total += words
with open("total.txt", "w") as out:
    out.write(f"{total}\n")
print(f"total: {total} words")
