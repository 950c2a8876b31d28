"""The mark of a running core: an abstract unix socket named for its pid and start time.

A heartbeat in Redis names the core that writes it (pid, start time, host, boot id), but
anyone who can write to Redis can copy those of any live process of the host into a
forged heartbeat. Only a process of this host can bind a socket name, and a core holds
``\\0soaf-core-<pid>-<start time>`` for as long as it lives (the kernel drops it with the
process), so "that pid is a core" is checked here, without trusting Redis. Abstract
names live in the network namespace: cores that share a host identity must share one.
"""

from __future__ import annotations

import errno
import os
import socket

from soaf.process.identity import ProcIdentity


def _name(pid: int, start_time: int) -> bytes:
    return f"\0soaf-core-{pid}-{start_time}".encode()


def mark_core() -> socket.socket | None:
    """Take this process's mark (keep the socket open for the life of the core); None
    where abstract sockets are not available."""
    me = ProcIdentity.of(os.getpid())
    if me is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(_name(me.pid, me.start_time))
    except OSError:
        sock.close()
        return None
    return sock


def is_core(pid: int, start_time: int) -> bool | None:
    """Whether process ``pid`` (started at ``start_time``) holds a core's mark: True or
    False, or None when this machine cannot tell."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(_name(pid, start_time))
    except OSError as e:
        return True if e.errno == errno.EADDRINUSE else None
    finally:
        probe.close()
    return False
