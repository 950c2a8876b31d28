"""Prints 'tick <i>' every DELAY seconds, COUNT times, flushing each line."""
import sys
import time

count = int(sys.argv[1]) if len(sys.argv) > 1 else 10
delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
for i in range(count):
    print(f"tick {i}", flush=True)
    time.sleep(delay)
