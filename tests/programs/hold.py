"""A black box for recovery tests: runs SECONDS while holding an exclusive lock named
after its service id, so two runs of one service at the same time are caught.

usage: hold.py SECONDS LOGDIR ID [CODE [UNTIL]]
With UNTIL (a path) it runs until that file exists instead of SECONDS. Appends
"start|end|overlap ID PID TIME" lines to LOGDIR/runs.log and writes a tick file into its
work dir every 0.2 s.
"""

import fcntl
import os
import sys
import time

seconds, logdir, sid = float(sys.argv[1]), sys.argv[2], sys.argv[3]
code = int(sys.argv[4]) if len(sys.argv) > 4 else 0
until = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None


def log(what):
    with open(os.path.join(logdir, "runs.log"), "a") as f:
        f.write(f"{what} {sid} {os.getpid()} {time.time():.6f}\n")


lock = open(os.path.join(logdir, sid + ".lock"), "w")  # noqa: SIM115 - held until exit
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    log("overlap")
    sys.exit(75)
log("start")
end = time.monotonic() + seconds
tick = 0
while (not os.path.exists(until)) if until else time.monotonic() < end:
    time.sleep(min(0.2, max(0.0, end - time.monotonic())) if not until else 0.2)
    tick += 1
    with open(f"tick{tick}.txt", "w") as f:
        f.write(str(tick))
log("end")
sys.exit(code)
