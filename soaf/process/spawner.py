"""The core's end of its spawner (soaf.process.spawnserver): start it, ask it for programs.

Spawning from the core itself costs the core a fork of its whole (large, threaded) self per
program, and a program whose exit must outlive the core needed a shell between the two
(soaf.process.shim). The spawner is a small process of its own session that does both
jobs once for all programs: the core sends it a request (argv, cwd, env, output files, the
exit file, a cgroup) over one socket and reads the pid (or the ``errno`` that stopped the
program) back; the spawner sends every program's exit (status and rusage) over a second
socket, which the core's reaper thread reads (soaf.process.reaper).

Should the spawner be unable to start, ``start`` returns None and the core spawns its
programs under the shim, as before. Should it die, its programs become the core's children
(the core is a subreaper): the reaper reaps them itself, and starts a new spawner.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from soaf.process import affinity, spawnserver
from soaf.process.census import RUN_VAR

log = logging.getLogger(__name__)

_HEADER = spawnserver.HEADER
#: Seconds the core waits for a new spawner to say it is ready.
READY_TIMEOUT = 10.0


def put_environment(request: dict[str, Any], env: dict[str, str],
                    base: dict[str, str] | None) -> dict[str, str]:
    """Put ``env`` into ``request``: whole (``env``), or as what differs from ``base``, the
    last one sent whole (``env_set``, ``env_unset``) when that is much less (the spawner
    rebuilds it: spawnserver.environment). Returns the environment the next request is to
    differ from."""
    if base is not None:
        changed = {k: v for k, v in env.items() if base.get(k) != v}
        if len(changed) * 4 <= len(env):
            request["env_set"] = changed
            request["env_unset"] = [k for k in base if k not in env]
            return base
    request["env"] = env
    return dict(env)


class Reader:
    """The messages of one socket for a reader that takes them as they come: each ``recv``
    takes whatever has arrived (a reply and its length at once, often several exits), where
    ``receive`` asks for the length and then the message, two system calls each."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    def ready(self) -> bool:
        """A whole message is here already (reading it waits for nothing)."""
        buffer = self._buffer
        return (len(buffer) >= _HEADER.size
                and len(buffer) >= _HEADER.size + _HEADER.unpack_from(buffer)[0])

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None at the end of the stream."""
        buffer = self._buffer
        while not self.ready():
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            buffer += chunk
        end = _HEADER.size + _HEADER.unpack_from(buffer)[0]
        body = bytes(buffer[_HEADER.size:end])
        del buffer[:end]
        message: dict[str, Any] = json.loads(body)
        return message


def receive(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None at the end of the stream: its length, then no more than
    it (the spawner's hello, before the socket is handed to a ``Reader``)."""
    head = _exactly(sock, _HEADER.size)
    if head is None:
        return None
    body = _exactly(sock, _HEADER.unpack(head)[0])
    return None if body is None else json.loads(body)


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class SpawnerGone(Exception):
    """The spawner is not there (any more): spawn the program another way."""


class Spawner:
    """A running spawner: ``spawn`` from any thread; ``events`` for the reaper thread."""

    def __init__(self, proc: subprocess.Popen[bytes], requests: socket.socket,
                 events: socket.socket, rss_kb: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.requests = requests
        self.events = events
        #: The spawner's own peak memory, which a program's rusage starts from.
        self.rss_kb = rss_kb
        self._lock = threading.Lock()  # sending
        self._reading = threading.Lock()
        self._replies_in = Reader(requests)
        self._events_in = Reader(events)
        self._sent = self._received = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self.gone = False
        #: The last environment sent whole: later requests send only how theirs differs
        #: (spawnserver.environment). Most programs run with the core's environment and a
        #: variable or two more, and the whole one was most of every request.
        self._env: dict[str, str] | None = None

    @classmethod
    def start(cls) -> Spawner | None:
        """A new spawner, or None (logged) if it cannot be started."""
        mine_r, theirs_r = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mine_e, theirs_e = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with affinity.spread():  # its programs get every CPU, not the core's one
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", spawnserver.__file__,
                     str(theirs_r.fileno()), str(theirs_e.fileno())],
                    pass_fds=(theirs_r.fileno(), theirs_e.fileno()), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, cwd="/", start_new_session=True)
        except OSError as e:
            log.warning("cannot start the spawner (%s); programs run under the shim", e)
            for s in (mine_r, theirs_r, mine_e, theirs_e):
                s.close()
            return None
        finally:
            theirs_r.close()
            theirs_e.close()
        mine_r.settimeout(READY_TIMEOUT)
        try:
            hello = receive(mine_r)
        except OSError:
            hello = None
        if hello is None:
            log.warning("the spawner did not start; programs run under the shim")
            mine_r.close()
            mine_e.close()
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            return None
        mine_r.settimeout(None)
        log.debug("spawner started, pid %d", proc.pid)
        return cls(proc, mine_r, mine_e, int(hello.get("rss", 0)))

    def spawn(self, argv: list[str], *, cwd: Path, env: dict[str, str], stdout: Path,
              stderr: Path, exit_file: Path | None, cgroup: Path | None) -> int:
        """The new program's pid; OSError as a direct spawn would raise it (its
        ``filename`` the cwd when that was the problem); SpawnerGone if the spawner is.

        Requests from many threads are sent without waiting for one another's replies, so
        the spawner takes whatever has queued up each time it runs."""
        request: dict[str, Any] = {
            "argv": argv, "cwd": os.path.abspath(cwd),
            "stdout": os.path.abspath(stdout), "stderr": os.path.abspath(stderr),
            "exit_file": os.path.abspath(exit_file) if exit_file is not None else None,
            "cgroup": os.fspath(cgroup) if cgroup is not None else None}
        with self._lock:  # (in the order sent: each delta is from the last whole one)
            if self.gone:
                raise SpawnerGone
            request["token"] = env.get(RUN_VAR)
            self._env = put_environment(request, env, self._env)
            self._sent += 1
            mine = self._sent
            try:
                spawnserver.send(self.requests, request)
            except OSError:
                self.gone = True
                raise SpawnerGone from None
        reply = self._reply(mine)
        if "pid" in reply:
            self.rss_kb = int(reply.get("rss", self.rss_kb))
            return int(reply["pid"])
        code = int(reply["errno"])
        if reply.get("cwd"):
            raise OSError(code, reply.get("strerror") or os.strerror(code), str(cwd))
        raise OSError(code, reply.get("strerror") or os.strerror(code), argv[0])

    def _reply(self, mine: int) -> dict[str, Any]:
        """The reply to request number ``mine``. Replies come in the order of the
        requests: whichever waiting thread holds the reading lock reads them and leaves
        each for the thread that asked."""
        with self._reading:
            while mine not in self._replies:
                if self.gone:
                    raise SpawnerGone
                try:
                    reply = self._replies_in.receive()
                except (OSError, ValueError):
                    reply = None
                if reply is None:
                    self.gone = True
                    raise SpawnerGone
                self._received += 1
                self._replies[self._received] = reply
            return self._replies.pop(mine)

    def read_events(self) -> list[dict[str, Any]] | None:
        """The exits sent so far (reaper thread; it waits for one), or None once the
        spawner is gone."""
        events: list[dict[str, Any]] = []
        try:
            while True:
                event = self._events_in.receive()
                if event is None:
                    return events or None
                events.append(event)
                more = self._events_in.ready() or select.select([self.events], [], [], 0)[0]
                if not more:
                    return events
        except (OSError, ValueError):
            return events or None

    def close(self, wait: float = 0.5) -> None:
        """Let it go: it ends once its programs have; reaped if it does within ``wait``."""
        with self._lock:
            self.gone = True
            for s in (self.requests, self.events):
                with contextlib.suppress(OSError):
                    s.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(wait)
