"""Ignores SIGTERM (noting each one in signals.txt) and sleeps SECONDS; writes its pid."""
import os
import signal
import sys
import time

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60


def noted(signum, frame):
    with open("signals.txt", "a") as f:
        f.write(signal.Signals(signum).name + "\n")


signal.signal(signal.SIGTERM, noted)
with open("pid.txt", "w") as f:
    f.write(str(os.getpid()))
end = time.monotonic() + seconds
while time.monotonic() < end:
    time.sleep(0.05)
