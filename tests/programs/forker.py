"""Forks a child that ignores SIGTERM; both sleep. Writes both pids to pids.txt."""
import os
import signal
import sys
import time

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 300
child = os.fork()
if child == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    os._exit(0)
with open("pids.tmp", "w") as f:
    f.write(f"{os.getpid()} {child}\n")
os.rename("pids.tmp", "pids.txt")
time.sleep(seconds)
