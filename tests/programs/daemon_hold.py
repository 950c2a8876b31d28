"""Leaves a daemon behind (double fork and setsid), then runs on until the file
``release`` appears in its work dir, and exits 0.

The daemon writes its pid to daemon.txt and sleeps for 300 s."""
import os
import sys
import time

if os.fork() == 0:
    os.setsid()
    if os.fork():
        os._exit(0)
    with open("daemon.tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.rename("daemon.tmp", "daemon.txt")
    time.sleep(300)
    os._exit(0)
while not os.path.exists("release"):
    time.sleep(0.05)
sys.exit(0)
