#!/usr/bin/env python3
"""A black box that knows nothing of soaf: writes N chunk files, one every DELAY seconds.

Usage: chunks.py [--delay SECONDS] N
Writes out/chunk_001.json ... out/chunk_N.json (each holding its number and square).
"""

import argparse
import json
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--delay", type=float, default=0.5)
parser.add_argument("chunks", type=int)
opts = parser.parse_args()

os.makedirs("out", exist_ok=True)
for i in range(1, opts.chunks + 1):
    time.sleep(opts.delay)
    name = f"out/chunk_{i:03d}.json"
    with open(name + ".tmp", "w") as f:
        json.dump({"chunk": i, "square": i * i}, f)
    os.replace(name + ".tmp", name)  # a chunk appears whole, or not at all
