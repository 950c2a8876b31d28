"""One operating-system process: spawn, reap, stop, adopt, the exit shim, process identity.

Knows no Redis: everything here acts on this machine only.
"""
