"""The exit-status shim: a few lines of ``sh`` between the core and a program, so that the
program's exit status survives the death of the core; and reading an attempt's exit file.

A core normally spawns its programs through its spawner (soaf.process.spawnserver), which
is their parent and writes their exit files itself; the shim is the way when there is no
spawner (it could not be started, or has just died).

Only a process's parent learns its exit status. A core that is killed leaves its programs
running with nobody to report how they ended, so every program is started as

    sh -c SCRIPT soaf-shim EXIT_FILE PROGRAM ARGS...

The shell runs the program (as its child, in the same process group), writes the exit
status to EXIT_FILE when it ends, and then ends the same way: with the same code, or by
re-raising the signal that killed the program, so the core that spawned it sees exactly
what it would have seen without the shim. It catches SIGHUP/SIGINT/SIGTERM only to wait
for the program (which gets them with their default handling, as the group's member),
so a graceful stop keeps its grace period. Its own messages go to /dev/null; the
program's stdin, stdout and stderr are the ones the core gave.

What the shim cannot carry: CPU time and peak memory of a program that ends while its
core is down (only its parent, the shim, could read them), and the difference between
"killed by signal N" and "exited with code 128+N" (a shell reports both as 128+N).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import time
from pathlib import Path

from soaf.errors import ProgramError
from soaf.process.census import token_of
from soaf.process.identity import ProcIdentity, find_by_marker, pid_exists

#: The shim's $0, also how ``ps`` shows it.
NAME = "soaf-shim"

# Signals whose default action ends a process; only those are re-raised by the shim.
_TERMINATING = [
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGILL", "SIGTRAP", "SIGABRT", "SIGBUS", "SIGFPE",
    "SIGKILL", "SIGUSR1", "SIGSEGV", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM",
    "SIGSTKFLT", "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGSYS",
]  # fmt: skip
TERMINATING = sorted({int(getattr(signal, n)) for n in _TERMINATING if hasattr(signal, n)})

_END = ('echo "$c" > "$f"; case $c in ' + "|".join(str(128 + n) for n in TERMINATING)
        + ") trap - HUP INT TERM; ulimit -c 0; kill -$((c - 128)) $$;; esac; exit $c")
SCRIPT = ('f=$1; shift; trap : HUP INT TERM; exec 3>&2 2>/dev/null; (exec "$@" 2>&3 3>&-); '
          'c=$?; ' + _END)
#: The same, for a program that runs in a cgroup of its own (soaf.process.cgroup): the
#: program's subshell enters the cgroup ($2) first (if it cannot, the polled limit holds).
SCRIPT_CGROUP = ('f=$1; g=$2; shift 2; trap : HUP INT TERM; exec 3>&2 2>/dev/null; '
                 '(echo 0 > "$g/cgroup.procs"; exec "$@" 2>&3 3>&-); c=$?; ' + _END)

_MAGIC = (b"#!", b"\x7fELF")


_FOUND: dict[tuple[str, str], str] = {}


def _which(name: str, search: str) -> str | None:
    """``shutil.which``, remembering what it found (while it stays executable)."""
    found = _FOUND.get((name, search))
    if found is not None and os.access(found, os.X_OK):
        return found
    found = shutil.which(name, path=search)
    if found is not None:
        if len(_FOUND) > 1000:
            _FOUND.clear()
        _FOUND[(name, search)] = found
    return found


def _check(argv: list[str], cwd: Path, env: dict[str, str]) -> bool:
    """Raise ProgramError, in the words a direct spawn would use, if the program cannot be
    started; return True if it can safely run under the shim.

    The shell would report a missing program as exit code 127 and run a file without a
    '#!' line as a shell script; checking first keeps the plain error messages. A file that
    is neither a script nor an ELF binary (binfmt_misc) is started directly instead.
    """
    name = argv[0]
    if "/" in name:
        path = cwd / name
        if not path.exists():
            raise ProgramError(f"executable not found: {name} (No such file or directory)")
    else:
        found = _which(name, env.get("PATH", os.defpath))
        if found is None:
            raise ProgramError(f"executable not found: {name} (No such file or directory)")
        path = Path(found)
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or stat.S_ISDIR(st.st_mode) or not os.access(path, os.X_OK):
        raise ProgramError(f"permission denied running {name} (is it executable?)")
    return _runs_under_shim(path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


_HEADS: dict[tuple[Path, tuple[int, int, int, int]], bool] = {}


def _runs_under_shim(path: Path, version: tuple[int, int, int, int]) -> bool:
    """Whether ``path`` starts with '#!' or is an ELF binary; remembered while the file
    stays the same (a core spawns the same few programs over and over)."""
    known = _HEADS.get((path, version))
    if known is not None:
        return known
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    if len(_HEADS) > 1000:
        _HEADS.clear()
    _HEADS[(path, version)] = found = head.startswith(_MAGIC)
    return found


def wrap(argv: object, *, cwd: Path, env: dict[str, str], exit_file: Path,
         cgroup: Path | None = None) -> tuple[object, bool]:
    """``(argv to spawn, shimmed)``: the shimmed command line, or ``argv`` unchanged when
    it cannot run under the shim (not a list of strings, not a script or ELF binary), in
    which case the normal spawn reports any problem. ``cgroup``: the program runs in it."""
    if not isinstance(argv, (list, tuple)) or not argv or not all(isinstance(a, str) for a in argv):
        return argv, False
    if not _check(list(argv), cwd, env):
        return argv, False
    if cgroup is not None:
        return ["/bin/sh", "-c", SCRIPT_CGROUP, NAME, str(exit_file), str(cgroup), *argv], True
    return ["/bin/sh", "-c", SCRIPT, NAME, str(exit_file), *argv], True


def decode(code: int) -> int:
    """A shell status (0-255) as a returncode: negative for a terminating signal."""
    if code > 128 and code - 128 in TERMINATING:
        return -(code - 128)
    return code


def read_exit(exit_file: Path, *, wait: float = 0.0) -> int | None:
    """The program's returncode from its exit file, or None if none was written (yet);
    ``wait``: seconds to give its spawner to write it (``wait_exit``)."""
    ended = wait_exit(exit_file, wait) if wait else read_exit_usage(exit_file)
    return ended[0] if ended is not None else None


def read_exit_usage(exit_file: Path) -> tuple[int, float | None, int | None] | None:
    """``(returncode, cpu_time, max_rss_kb)`` from an exit file, or None if it holds no
    status (yet). The shim writes the shell's status only (its usage is then None); the
    spawner (soaf.process.spawnserver) writes the same first line, then the exact
    returncode, the CPU time and the peak memory it reaped the program with."""
    return _parse(_read(exit_file))[0]


def running_pid(exit_file: Path) -> int | None:
    """The pid the spawner noted in the exit file when it spawned the program, while the
    file holds no status yet."""
    return _parse(_read(exit_file))[1]


def running_token(exit_file: Path) -> str | None:
    """The run token the spawner noted beside that pid (``pid N spawner M token T``)."""
    return _token(_read(exit_file))


def _token(text: str) -> str | None:
    words = text.split("\n", 1)[0].split()
    return words[5] if len(words) == 6 and words[0] == "pid" and words[4] == "token" else None


def _read(exit_file: Path) -> str:
    try:
        return exit_file.read_text()
    except OSError:
        return ""


def _parse(text: str) -> tuple[tuple[int, float | None, int | None] | None, int | None,
                               int | None]:
    """(the status, if there is one; the running program's pid and its spawner's, if the
    file says it runs: ``pid N spawner M``)."""
    lines = text.split("\n")
    words = lines[0].split()
    if len(words) == 6 and words[4] == "token":  # (see running_token)
        words = words[:4]
    if words[:1] == ["pid"] and len(words) in (2, 4) and all(w.isdigit() for w in words[1::2]):
        return None, int(words[1]), int(words[3]) if len(words) == 4 else None
    try:
        code = decode(int(lines[0].strip()))
    except ValueError:
        return None, None, None  # nothing (yet)
    try:
        returncode, cpu, rss = lines[1].split()
        return (int(returncode), float(cpu), int(rss)), None, None
    except (IndexError, ValueError):
        return (code, None, None), None, None


def find_program(exit_file: str, token: str | None) -> list[ProcIdentity]:
    """The live program of the attempt whose exit file is ``exit_file``, spawned but
    perhaps not yet journaled: its shim, whose command line names the file, or the
    program whose pid its spawner noted there, if its environment holds the run's
    ``token`` (so a recycled pid is never taken): the journal's, or when it has none (the
    core died before it journaled the run) the one the spawner noted with the pid."""
    found = find_by_marker(exit_file)
    text = _read(Path(exit_file))  # (read once: the pid and the token noted with it)
    pid = _parse(text)[1]
    token = token or _token(text)  # not journaled yet: as spawned
    if not found and pid is not None and token and token_of(pid) == token.encode():
        identity = ProcIdentity.of(pid)
        if identity is not None and identity.alive():
            found.append(identity)
    return found


def wait_exit(exit_file: Path, timeout: float) -> tuple[int, float | None, int | None] | None:
    """``read_exit_usage``, waiting up to ``timeout`` seconds while the file says the
    program runs and the spawner that wrote so lives: it writes the status a moment after
    the program has ended. A dead spawner writes nothing more: no wait then (a restart after
    a crash would otherwise wait that long for each of its programs)."""
    deadline = time.monotonic() + timeout
    while True:
        ended, running, spawner = _parse(_read(exit_file))
        if ended is not None or running is None or time.monotonic() > deadline:
            return ended
        if spawner is not None and not pid_exists(spawner):
            return _parse(_read(exit_file))[0]  # (it may have written just before it died)
        time.sleep(0.01)
