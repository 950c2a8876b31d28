#!/usr/bin/env python3
"""A black box that knows nothing of soaf: add up word counts and list the top words.

Usage: merge.py [--delay SECONDS] [--top N] OUT IN...
Adds the JSON word counts of every IN, writes the sum to OUT (JSON) and the N most
frequent words to top.txt ("word count" per line). Prints "progress k/n", one per
input. Exits 1 if an input is missing or is not a JSON object of counts.
"""

import argparse
import collections
import json
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--delay", type=float, default=0.5)
parser.add_argument("--top", type=int, default=5)
parser.add_argument("output")
parser.add_argument("inputs", nargs="+")
opts = parser.parse_args()

total: collections.Counter = collections.Counter()
for k, name in enumerate(opts.inputs, 1):
    try:
        with open(name, encoding="utf-8") as f:
            total.update({str(w): int(c) for w, c in json.load(f).items()})
    except (OSError, ValueError, AttributeError) as e:
        print(f"merge: cannot read counts from {name}: {e}", file=sys.stderr)
        sys.exit(1)
    time.sleep(opts.delay / len(opts.inputs))
    print(f"progress {k}/{len(opts.inputs)}", flush=True)
with open(opts.output + ".tmp", "w") as out:
    json.dump(dict(sorted(total.items())), out)
os.replace(opts.output + ".tmp", opts.output)
with open("top.txt", "w") as out:
    for word, count in sorted(total.items(), key=lambda wc: (-wc[1], wc[0]))[: opts.top]:
        out.write(f"{word} {count}\n")
print(f"{sum(total.values())} words, {len(total)} distinct")
