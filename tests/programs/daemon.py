"""Leaves a daemon behind: double fork and setsid, then exits 0 at once.

The daemon forks a child that exits immediately (a zombie until someone reaps it) and
writes ``<daemon pid> <child pid>`` to daemon.txt before the program exits."""
import os
import sys
import time

if os.fork() == 0:
    os.setsid()
    if os.fork():
        os._exit(0)
    child = os.fork()
    if child == 0:
        os._exit(0)
    time.sleep(0.2)  # the child has exited: a zombie of the daemon, never reaped by it
    with open("daemon.tmp", "w") as f:
        f.write(f"{os.getpid()} {child}\n")
    os.rename("daemon.tmp", "daemon.txt")
    time.sleep(300)
    os._exit(0)
while not os.path.exists("daemon.txt"):
    time.sleep(0.01)
sys.exit(0)
