"""One operating-system process: spawn (through the core's spawner), reap, stop, adopt, the exit
shim, process identity.

Knows no Redis: everything here acts on this machine only.
"""
