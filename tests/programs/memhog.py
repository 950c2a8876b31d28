"""Allocates and touches MB mebibytes, a chunk at a time, then sleeps."""
import sys
import time

mb = int(sys.argv[1]) if len(sys.argv) > 1 else 300
chunks = []
for _ in range(mb):
    chunks.append(bytearray(1024 * 1024))
    time.sleep(0.01)
time.sleep(60)
