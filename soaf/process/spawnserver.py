"""The spawner: one small process per core that starts the core's programs and is their parent.

Only a process's parent learns its exit status, and a core may be killed. So the core does
not spawn its programs itself: this process does, and outlives the core. It is started by
the core (soaf.process.spawner) as ``python -I -S spawnserver.py REQUESTS EVENTS`` in a
session of its own, imports only a few standard modules (a small process spawns cheaply),
and then, single-threaded:

* spawns each program it is asked for with ``os.posix_spawn`` (its own session, stdin
  /dev/null, stdout and stderr appended to their files) and answers its pid, or the
  ``errno`` that stopped it (the core puts it in plain words). A program that runs in a
  cgroup of its own is forked, enters the cgroup, then is executed;
* notes the pid (and its own) in the attempt's exit file at once, so a core that dies
  before it has journaled the program still finds it;
* reaps each program when it ends (``wait4``: status and rusage), kills what is left of its
  process group, writes its exit file (soaf.process.shim.read_exit reads it: the status, and
  the CPU time and peak memory a core that was down could not learn otherwise), and sends
  the exit to the core;
* is the child subreaper of its programs' orphans, and reaps them;
* runs, where it may, a little above its programs' priority (they keep the core's): one
  process serves every spawn and exit of its core, and on a busy machine each spawn
  waits until its child is scheduled (a vfork), so at the same priority as the core's
  many threads it would be the bottleneck.

When the core goes (its end of the socket closes), it goes on reaping and writing exit
files until it has no child left, then exits. Nothing here imports soaf: this file runs
as a script.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
from typing import Any

_PR_SET_CHILD_SUBREAPER = 36
#: A message's length, before it (then its JSON).
HEADER = struct.Struct("!I")
#: Signals Python ignores, which a program starts with at their default action.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
#: Seconds spent reaping a dead program's killed group members before its exit is sent.
GROUP_REAP_WAIT = 0.2


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(frame(message))


#: json.dumps builds an encoder per call; the messages are plain (texts, numbers, lists).
_MAKE = getattr(json.encoder, "c_make_encoder", None)
_ENCODE: Any = _MAKE and _MAKE(
    None, str, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)


def frame(message: dict[str, Any]) -> bytes:
    """``message`` as sent: its length, then its JSON."""
    data = ("".join(_ENCODE(message, 0)) if _ENCODE else json.dumps(message)).encode()
    return HEADER.pack(len(data)) + data


def environment(request: dict[str, Any], base: dict[str, str] | None) -> dict[str, str]:
    """The environment a request asks for: whole (``env``), or what differs from the last
    one sent whole (``env_set``, ``env_unset``; soaf.process.spawner.put_environment)."""
    if "env" in request:
        env: dict[str, str] = request["env"]
        return env
    if base is None:
        raise ValueError("an environment delta came before any whole environment")
    env = {**base, **request["env_set"]}
    for name in request["env_unset"]:
        env.pop(name, None)
    return env


def _word(text: str) -> bool:
    return bool(text) and len(text) <= 256 and not any(c.isspace() for c in text)


def shell_status(returncode: int) -> int:
    """A returncode as a shell reports it (128+N for signal N): the exit file's first line."""
    return 128 - returncode if returncode < 0 else returncode


_FOUND: dict[tuple[str, str], str] = {}


def _resolve(name: str, env: dict[str, str], *, again: bool = False) -> str:
    """The file to execute for ``name``, searched in the program's own PATH (remembered:
    a core spawns the same few programs over and over; ``again`` searches anew)."""
    if "/" in name:
        return name
    key = (name, env.get("PATH", ""))
    if not again and key in _FOUND:
        return _FOUND[key]
    if len(_FOUND) > 1000:
        _FOUND.clear()
    _FOUND[key] = found = _search(name, env)
    return found


def _search(name: str, env: dict[str, str]) -> str:
    fallback = None
    for directory in os.get_exec_path(env):
        path = os.path.join(directory or ".", name)
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return path
            fallback = fallback or path
    if fallback is not None:
        return fallback  # exec reports why it cannot run
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


class Server:
    def __init__(self, requests: socket.socket, events: socket.socket) -> None:
        self.requests = requests
        self.events: socket.socket | None = events
        self.leaders: dict[int, str] = {}  # running programs -> their exit files
        self.env: dict[str, str] | None = None  # the last environment sent whole
        self.spawned = 0
        self.hwm = peak_kb()
        #: The core's niceness, which its programs keep, when this process could raise its
        #: own priority above theirs (it must not wait for the CPU behind them).
        self.nice: int | None = None
        here = os.getpriority(os.PRIO_PROCESS, 0)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, max(-20, here - 5))
            self.nice = here
        except OSError:
            pass

    def spawn(self, m: dict[str, Any]) -> dict[str, Any]:
        try:
            m["env"] = environment(m, self.env)
        except (ValueError, KeyError, TypeError) as e:
            return {"errno": errno.EINVAL, "strerror": f"bad environment in the request: {e}"}
        if "env_set" not in m:
            self.env = m["env"]
        try:
            os.chdir(m["cwd"])
        except OSError as e:
            return {"errno": e.errno, "strerror": e.strerror, "cwd": True}
        try:
            try:
                pid = self._start(_resolve(m["argv"][0], m["env"]), m)
            except (FileNotFoundError, PermissionError, NotADirectoryError):
                again = _resolve(m["argv"][0], m["env"], again=True)  # moved, or gone?
                pid = self._start(again, m)
        except OSError as e:
            return {"errno": e.errno, "strerror": e.strerror}
        if self.nice is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, pid, self.nice)  # the core's, not ours
            except OSError:
                pass
        self.leaders[pid] = m.get("exit_file") or ""
        if self.leaders[pid]:  # with the run's token: a core that restarts finds the program
            token = m.get("token")      # even before it was journaled (soaf.process.shim)
            token = f" token {token}" if isinstance(token, str) and _word(token) else ""
            _write(self.leaders[pid], f"pid {pid} spawner {os.getpid()}{token}\n")
        self.spawned += 1
        if self.spawned % 64 == 0:
            self.hwm = peak_kb()
        return {"pid": pid, "rss": self.hwm}

    def _start(self, path: str, m: dict[str, Any]) -> int:
        if m.get("cgroup"):
            return self._fork_into(path, m)
        return os.posix_spawn(path, m["argv"], m["env"], file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, m["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666),
            (os.POSIX_SPAWN_OPEN, 2, m["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666),
        ], setsid=True, setsigmask=(), setsigdef=_DEFAULT_SIGNALS)

    @staticmethod
    def _fork_into(path: str, m: dict[str, Any]) -> int:
        """Fork, enter the cgroup, execute: the program never runs outside its cgroup (if
        it cannot enter it, the core's polled limit still holds)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                os.setsid()
                for sig in _DEFAULT_SIGNALS:
                    try:
                        signal.signal(sig, signal.SIG_DFL)
                    except (OSError, ValueError):
                        pass
                for fd, name, flags in ((0, "/dev/null", os.O_RDONLY),
                                        (1, m["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT),
                                        (2, m["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)):
                    opened = os.open(name, flags, 0o666)
                    os.dup2(opened, fd)
                    os.close(opened)
                _write(os.path.join(m["cgroup"], "cgroup.procs"), "0")
                os.execve(path, m["argv"], m["env"])
            except OSError as e:
                os.write(w, str(e.errno).encode())
            finally:
                os._exit(127)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            failed = f.read()
        if failed:
            os.waitpid(pid, 0)
            code = int(failed)
            raise OSError(code, os.strerror(code))
        return pid

    def reap(self) -> None:
        """Reap every child that has ended; report the programs' exits, all at once (one
        send, one wake-up of the core's reaper, for the exits of one look)."""
        exits: list[bytes] = []
        try:
            while True:
                try:
                    pid, status, usage = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                exit_file = self.leaders.pop(pid, None)
                if exit_file is not None:
                    exits.append(self._ended(pid, status, usage, exit_file))
        finally:
            if exits and self.events is not None:
                try:
                    self.events.sendall(b"".join(exits))
                except OSError:
                    self.events = None  # the core is gone; the exit files tell the next one

    def _ended(self, pid: int, status: int, usage: resource.struct_rusage, exit_file: str
               ) -> bytes:
        """Finish a program that ended (its group killed and reaped, its exit file written);
        its exit as a message for the core."""
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever the program left in its group goes
            killed = True
        except OSError:
            killed = False
        if killed:
            self._reap_group(pid)
        code = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        if exit_file:  # whole at once: a reader never sees it half written
            _write(exit_file + ".new", f"{shell_status(code)}\n{code} {cpu:.6f} {usage.ru_maxrss}\n")
            try:
                os.rename(exit_file + ".new", exit_file)
            except OSError:
                pass
        return frame({"pid": pid, "status": status, "cpu": cpu, "utime": usage.ru_utime,
                      "stime": usage.ru_stime, "maxrss": usage.ru_maxrss})

    @staticmethod
    def _reap_group(pgid: int) -> None:
        import time  # only for a program that left members in its group

        until = time.monotonic() + GROUP_REAP_WAIT
        while time.monotonic() < until:
            try:
                if os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG) is None:
                    time.sleep(0.002)
            except ChildProcessError:
                return

    def _answer(self, buffer: bytearray) -> bool:
        """Spawn what the requests that have arrived ask for: one ``recv`` takes all the
        core's threads sent meanwhile (``buffer`` keeps a request not whole yet). Each is
        answered at once: a reply held back for the next spawn costs more than the send it
        saves (measured). False once the core is gone (or sent what is not a request)."""
        try:
            chunk = self.requests.recv(65536)
            if not chunk:
                return False
            buffer += chunk
            while len(buffer) >= HEADER.size:
                end = HEADER.size + HEADER.unpack_from(buffer)[0]
                if len(buffer) < end:
                    break
                message = json.loads(bytes(buffer[HEADER.size:end]))
                del buffer[:end]
                self.requests.sendall(frame(self.spawn(message)))
        except (OSError, ValueError):  # (ValueError: a request that is not JSON)
            self.requests.close()  # the core reads the end: it starts another spawner
            return False
        return True

    def serve(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        core = True
        pending = bytearray()
        while True:
            watched: list[Any] = [self.requests, wake_r] if core else [wake_r]
            ready, _, _ = select.select(watched, [], [], 1.0)
            if wake_r in ready:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
            self.reap()
            if core and self.requests in ready:
                core = self._answer(pending)
                if not core:  # the core is gone (or has stopped): finish what runs
                    self.events = None
            if not core and not _has_children():
                return


def peak_kb() -> int:
    """This process's peak resident memory (KiB), which a program it spawns starts its
    own peak from (``ru_maxrss`` counts the memory a vfork'd child shared until exec)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _has_children() -> bool:
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _write(path: str, text: str) -> None:
    """Write a small file (its directory made if need be: an attempt's journal may not
    have been saved yet); a failure is the reader's business (it finds no status)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, flags, 0o644)
        except OSError:
            return
    except OSError:
        return
    try:
        os.write(fd, text.encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def main(argv: list[str]) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    os.chdir("/")
    requests = socket.socket(fileno=int(argv[1]))
    events = socket.socket(fileno=int(argv[2]))
    server = Server(requests, events)
    send(requests, {"pid": os.getpid(), "rss": server.hwm})
    server.serve()


if __name__ == "__main__":
    main(sys.argv)
