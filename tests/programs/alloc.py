"""Allocates and touches MB mebibytes at RATE MiB/s (0: at once), holds them HOLD seconds,
then exits 0: ``alloc.py MB [HOLD] [RATE]``."""
import sys
import time

mb = int(sys.argv[1])
hold = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
rate = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
chunks = []
start = time.monotonic()
for i in range(mb):
    chunk = bytearray(1024 * 1024)
    for j in range(0, len(chunk), 4096):
        chunk[j] = 1
    chunks.append(chunk)
    if rate:
        ahead = start + (i + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
time.sleep(hold)
