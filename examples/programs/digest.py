#!/usr/bin/env python3
"""A black box that knows nothing of soaf: describes text files, one report per input.

Usage: digest.py [--delay SECONDS] FILE...
Writes reports/<FILE>.json (lines, words, bytes, sha256, the most common word) for each
input, pausing between files so progress can be followed, then summary.json over all
of them. Exits 1 if an input is missing.
"""

import argparse
import collections
import hashlib
import json
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--delay", type=float, default=0.5)
parser.add_argument("files", nargs="*")
opts = parser.parse_args()

os.makedirs("reports", exist_ok=True)
summary = {"files": 0, "lines": 0, "words": 0, "bytes": 0}
for name in opts.files:
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        print(f"digest: {e}", file=sys.stderr)
        sys.exit(1)
    words = data.decode("utf-8", errors="replace").split()
    common = collections.Counter(words).most_common(1)
    report = {
        "file": name,
        "lines": data.count(b"\n"),
        "words": len(words),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "most_common": common[0][0] if common else None,
    }
    time.sleep(opts.delay)
    with open(os.path.join("reports", os.path.basename(name) + ".json"), "w") as out:
        json.dump(report, out, indent=1)
    print(f"{name}: {report['words']} words", flush=True)
    for key in ("lines", "words", "bytes"):
        summary[key] += report[key]
    summary["files"] += 1
with open("summary.json", "w") as out:
    json.dump(summary, out, indent=1)
print(f"summary: {summary}")
