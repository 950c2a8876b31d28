"""Settings for cores and clients: defaults < environment (SOAF_*) < flags, validated once.

Clients and cores find the same Redis and secret the same way: the environment first,
then the files an embedded core writes into its state directory (``.soaf/`` by default).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaf.errors import ConfigError
from soaf.protocol.codec import DEFAULT_MAX_PAYLOAD
from soaf.protocol.durable import replicas as durable_replicas
from soaf.protocol.keys import DEFAULT_PREFIX
from soaf.protocol.queues import parse_labels
from soaf.protocol.sentinel import env_redis_url

#: Where an embedded core keeps its Redis data, the URL file and the secret.
DEFAULT_STATE_DIR = ".soaf"
#: Services one core runs at once; beyond this it reads no new submissions.
DEFAULT_MAX_SERVICES = 64
#: Seconds between heartbeats; the heartbeat key lives DEFAULT_HEARTBEAT_TTL seconds.
DEFAULT_HEARTBEAT_INTERVAL = 2.0
DEFAULT_HEARTBEAT_TTL = 10.0
#: Seconds between the periodic plugin scans (a hash of the sources) that back up
#: file-system notifications, which some file systems never deliver; 0 turns it off.
DEFAULT_RELOAD_POLL = 2.0
#: Seconds of quiet after a plugin file changes before the packages are reloaded,
#: so a burst of saves gives one reload.
DEFAULT_RELOAD_DEBOUNCE = 0.2
#: Seconds between checks of a running service's work dir for new, removed or renamed
#: files, so file_change_callback runs promptly after a change (0: only every interval).
DEFAULT_FILE_POLL = 0.05
#: Seconds a plugin import may take before it is abandoned as hung and the last good
#: version kept (generous: the first import of heavy libraries can take a while).
DEFAULT_RELOAD_TIMEOUT = 30.0
#: Seconds between SIGTERM and SIGKILL when a program is stopped.
DEFAULT_KILL_GRACE = 5.0
#: Largest stdout/stderr file kept per service; older output is dropped, the tail kept.
DEFAULT_LOG_MAX_BYTES = 10 * 1024 * 1024
#: Seconds between two passes of the log keeper (capping files, copying lines to Redis).
DEFAULT_LOG_INTERVAL = 0.5
#: Lines of each service's output kept in Redis for ``Client.logs`` (approximate).
DEFAULT_LOG_LINES = 1000
#: Seconds ``after_watch_callback`` may take (and a callback still running when the
#: program ends may go on) before soaf gives up on it and records the service's end.
DEFAULT_CALLBACK_TIMEOUT = 300.0

#: Seconds a final service's record and events are kept (0: forever).
DEFAULT_RECORD_TTL = 7 * 24 * 3600.0
#: Seconds an entry may reach the submit stream after its payload was signed: later, a replay.
DEFAULT_MAX_SUBMIT_DELAY = 600.0
#: Seconds a network operation of staging or uploading (connect, one read) may take.
DEFAULT_FETCH_TIMEOUT = 60.0
#: Seconds between the core's sweeps of its work root (0: no periodic sweep).
DEFAULT_GC_INTERVAL = 600.0
#: What becomes of a succeeded service's work dir once it is old enough: ``remove`` it,
#: keep only its ``outputs`` (and the program's stdout/stderr logs), or ``keep`` it whole.
SUCCESS_ACTIONS = ("remove", "outputs", "keep")
DEFAULT_ON_SUCCESS = "remove"
#: Hours a finished work dir is left alone: succeeded ones for a look at the results,
#: failed (cancelled, timed out) ones much longer, for inspection.
DEFAULT_KEEP_SUCCEEDED_HOURS = 24.0
DEFAULT_KEEP_FAILED_HOURS = 7 * 24.0

SECRET_FILE = "secret"
#: The well-known key of ``--insecure`` cores (and clients with SOAF_INSECURE=1): it
#: signs, but proves nothing, since everybody knows it.
INSECURE_SECRET = "soaf-insecure-well-known-key"
URL_FILE = "redis.url"



def host_name() -> str:
    """This machine's identity wherever soaf compares hosts: ``SOAF_HOST_ID`` when set
    (tests; containers that share a kernel but not their processes), else the host name
    (asked of the kernel at most once a minute: each run asks twice)."""
    return os.environ.get("SOAF_HOST_ID") or _kernel_host_name()


_HOST: list[Any] = [None, 0.0]  # the host name, and when to ask the kernel again
HOST_NAME_TTL = 60.0


def _kernel_host_name() -> str:
    name, until = _HOST
    now = time.monotonic()
    if name is None or now >= until:
        name = _HOST[0] = socket.gethostname()
        _HOST[1] = now + HOST_NAME_TTL
    return str(name)


def state_dir_from_env() -> Path:
    return Path(os.environ.get("SOAF_STATE_DIR", DEFAULT_STATE_DIR)).expanduser()


def parse_secrets(text: str) -> list[str]:
    """Keys from a comma- or newline-separated list, in order, without blanks or repeats."""
    keys = [k.strip() for k in text.replace("\n", ",").split(",")]
    return list(dict.fromkeys(k for k in keys if k))


def configured_secrets(secret_file: str | Path | None = None) -> list[str]:
    """The keys given explicitly: SOAF_SECRET, or a secret file (``secret_file``, else
    SOAF_SECRET_FILE). The first key signs; all are accepted (key rotation). Errors name
    the file, never its content."""
    env = os.environ.get("SOAF_SECRET", "")
    path = secret_file or os.environ.get("SOAF_SECRET_FILE", "").strip() or None
    if env.strip() and path:
        raise ConfigError("set SOAF_SECRET or a secret file (SOAF_SECRET_FILE/--secret-file), "
                          "not both")
    if env.strip():
        return parse_secrets(env)
    if path is None:
        return []
    try:
        keys = parse_secrets(Path(path).expanduser().read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"secret file {path} is not UTF-8 text")
    except OSError as e:
        raise ConfigError(f"cannot read secret file {path}: {e.strerror or type(e).__name__}")
    if not keys:
        raise ConfigError(f"secret file {path} holds no key")
    return keys


def find_secrets(state_dir: Path | None = None) -> list[str]:
    """Secrets a client or core knows: SOAF_SECRET or SOAF_SECRET_FILE (see
    ``configured_secrets``), else the embedded core's secret file, else the well-known
    key when SOAF_INSECURE is set."""
    keys = configured_secrets()
    if keys:
        return keys
    path = (state_dir or state_dir_from_env()) / SECRET_FILE
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    if text:
        return [text]
    if os.environ.get("SOAF_INSECURE", "") in ("1", "true", "yes"):
        return [INSECURE_SECRET]
    return []


def find_redis_url(state_dir: Path | None = None) -> str | None:
    """SOAF_REDIS_URL (or SOAF_SENTINELS), else the URL an embedded core recorded, else None."""
    env = env_redis_url()
    if env:
        return env
    path = (state_dir or state_dir_from_env()) / URL_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _env_float(name: str, default: Any) -> Any:
    if not (raw := os.environ.get(name)):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}")


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str | int, *, name: str = "size") -> int:
    """Bytes in ``"500M"``, ``"20G"``, ``"1.5T"`` or a plain number; ConfigError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    raw = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1:] if raw[-1:] in _SIZE_UNITS else ""
    try:
        return int(float(raw[: len(raw) - len(unit)]) * _SIZE_UNITS[unit])
    except ValueError:
        raise ConfigError(f"{name} must be a size like 500M or 20G, got {text!r}")


@dataclass(frozen=True)
class RetentionPolicy:
    """How long finished work dirs stay under the work root (see soaf/data/retention.py).

    Unfinished services' dirs are never touched. A succeeded dir is left whole for
    ``keep_succeeded_hours``, then ``on_success`` applies; a failed, cancelled or timed
    out one stays ``keep_failed_hours`` (``inf``: forever), then goes. When the finished
    dirs together pass ``max_bytes`` (0: no cap), the oldest go first, succeeded before
    failed, whatever their age.
    """

    on_success: str = DEFAULT_ON_SUCCESS
    keep_succeeded_hours: float = DEFAULT_KEEP_SUCCEEDED_HOURS
    keep_failed_hours: float = DEFAULT_KEEP_FAILED_HOURS
    max_bytes: int = 0

    @classmethod
    def load(cls, **flags: Any) -> RetentionPolicy:
        """Defaults < SOAF_ON_SUCCESS, SOAF_KEEP_SUCCEEDED_HOURS, SOAF_KEEP_FAILED_HOURS,
        SOAF_MAX_WORK_BYTES < non-None ``flags``."""
        values: dict[str, Any] = {
            "on_success": os.environ.get("SOAF_ON_SUCCESS") or DEFAULT_ON_SUCCESS,
            "keep_succeeded_hours": _env_float("SOAF_KEEP_SUCCEEDED_HOURS",
                                               DEFAULT_KEEP_SUCCEEDED_HOURS),
            "keep_failed_hours": _env_float("SOAF_KEEP_FAILED_HOURS", DEFAULT_KEEP_FAILED_HOURS),
            "max_bytes": os.environ.get("SOAF_MAX_WORK_BYTES") or 0,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        for name, value in flags.items():
            if name not in known:
                raise ConfigError(f"unknown retention setting {name!r}")
            if value is not None:
                values[name] = value
        values["max_bytes"] = parse_size(values["max_bytes"], name="max work bytes")
        policy = cls(**values)
        policy.validate()
        return policy

    def validate(self) -> None:
        if self.on_success not in SUCCESS_ACTIONS:
            raise ConfigError(f"on success must be one of {', '.join(SUCCESS_ACTIONS)}, "
                              f"got {self.on_success!r}")
        for name in ("keep_succeeded_hours", "keep_failed_hours"):
            value = getattr(self, name)
            if not value >= 0:  # also refuses NaN
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 0, got {value!r}")
        if self.max_bytes < 0:
            raise ConfigError(f"max work bytes must be >= 0, got {self.max_bytes}")


@dataclass
class Settings:
    """Everything a core needs to know; build it with ``Settings.load(**flags)``."""

    redis_url: str | None = None
    secrets: list[str] = field(default_factory=list, repr=False)
    work_root: Path = Path(DEFAULT_STATE_DIR) / "work"
    plugins: Path = Path(".")
    node: str = field(default_factory=socket.gethostname)
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    prefix: str = DEFAULT_PREFIX
    max_services: int = DEFAULT_MAX_SERVICES
    #: CPUs and memory (MiB) the services that declare needs share; None: this machine's
    #: CPU count and ~90% of its RAM (soaf.core.admission).
    cpus: float | None = None
    memory_mb: float | None = None
    #: What this core has (``--labels gpu,bigmem``): it takes services whose ``requires`` it covers.
    labels: frozenset[str] = frozenset()
    max_payload: int = DEFAULT_MAX_PAYLOAD
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL
    reload_poll: float = DEFAULT_RELOAD_POLL
    reload_debounce: float = DEFAULT_RELOAD_DEBOUNCE
    file_poll: float = DEFAULT_FILE_POLL
    #: The CPU the ``soaf core`` command keeps its threads on: auto, off or a CPU number
    #: (soaf.core.cpuhome).
    core_cpu: str = "auto"
    reload_timeout: float = DEFAULT_RELOAD_TIMEOUT
    reload_watch: bool = True
    kill_grace: float = DEFAULT_KILL_GRACE
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    log_interval: float = DEFAULT_LOG_INTERVAL
    log_lines: int = DEFAULT_LOG_LINES
    callback_timeout: float = DEFAULT_CALLBACK_TIMEOUT
    insecure: bool = False
    record_ttl: float = DEFAULT_RECORD_TTL
    #: Replicas that must hold a final state before it counts as written (0: none);
    #: SOAF_DURABLE_SUBMIT / SOAF_DURABLE_REPLICAS, see soaf.protocol.durable.
    durable_replicas: int = 0
    #: Seconds a signed payload whose record is gone may run (replays); None: record_ttl.
    max_payload_age: float | None = None
    #: Seconds an entry may be added after its payload was signed (0: no limit).
    max_submit_delay: float = DEFAULT_MAX_SUBMIT_DELAY
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    gc_interval: float = DEFAULT_GC_INTERVAL
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    secret_file: Path | None = None

    @classmethod
    def load(cls, **flags: Any) -> Settings:
        """Defaults, overridden by SOAF_* variables, overridden by non-None ``flags``."""
        state_dir = Path(flags.get("state_dir") or state_dir_from_env())
        values: dict[str, Any] = {
            "redis_url": env_redis_url(),
            "work_root": Path(os.environ.get("SOAF_WORK_ROOT", state_dir / "work")),
            "plugins": Path(os.environ.get("SOAF_PLUGINS", ".")),
            "node": os.environ.get("SOAF_NODE") or socket.gethostname(),
            "state_dir": state_dir,
            "prefix": os.environ.get("SOAF_PREFIX", DEFAULT_PREFIX),
            "max_services": _env_int("SOAF_MAX_SERVICES", DEFAULT_MAX_SERVICES),
            "cpus": _env_float("SOAF_CPUS", None),
            "memory_mb": _env_float("SOAF_MEMORY_MB", None),
            "labels": os.environ.get("SOAF_LABELS", ""),
            "max_payload": _env_int("SOAF_MAX_PAYLOAD", DEFAULT_MAX_PAYLOAD),
            "heartbeat_interval": _env_float("SOAF_HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL),
            "heartbeat_ttl": _env_float("SOAF_HEARTBEAT_TTL", DEFAULT_HEARTBEAT_TTL),
            "reload_poll": _env_float("SOAF_RELOAD_POLL", DEFAULT_RELOAD_POLL),
            "reload_debounce": _env_float("SOAF_RELOAD_DEBOUNCE", DEFAULT_RELOAD_DEBOUNCE),
            "file_poll": _env_float("SOAF_FILE_POLL", DEFAULT_FILE_POLL),
            "core_cpu": os.environ.get("SOAF_CORE_CPU", "auto").strip().lower() or "auto",
            "reload_timeout": _env_float("SOAF_RELOAD_TIMEOUT", DEFAULT_RELOAD_TIMEOUT),
            "reload_watch": os.environ.get("SOAF_RELOAD_WATCH", "1") not in ("0", "false", "no"),
            "kill_grace": _env_float("SOAF_KILL_GRACE", DEFAULT_KILL_GRACE),
            "log_max_bytes": _env_int("SOAF_LOG_MAX_BYTES", DEFAULT_LOG_MAX_BYTES),
            "log_interval": _env_float("SOAF_LOG_INTERVAL", DEFAULT_LOG_INTERVAL),
            "log_lines": _env_int("SOAF_LOG_LINES", DEFAULT_LOG_LINES),
            "callback_timeout": _env_float("SOAF_CALLBACK_TIMEOUT", DEFAULT_CALLBACK_TIMEOUT),
            "insecure": os.environ.get("SOAF_INSECURE", "") in ("1", "true", "yes"),
            "record_ttl": _env_float("SOAF_RECORD_TTL", DEFAULT_RECORD_TTL),
            "durable_replicas": durable_replicas(),
            "max_payload_age": _env_float("SOAF_MAX_PAYLOAD_AGE", None),
            "max_submit_delay": _env_float("SOAF_MAX_SUBMIT_DELAY", DEFAULT_MAX_SUBMIT_DELAY),
            "fetch_timeout": _env_float("SOAF_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT),
            "gc_interval": _env_float("SOAF_GC_INTERVAL", DEFAULT_GC_INTERVAL),
        }
        if flags.get("retention") is None:
            values["retention"] = RetentionPolicy.load()
        known = {f.name for f in dataclasses.fields(cls)}
        for name, value in flags.items():
            if name not in known:
                raise ConfigError(f"unknown setting {name!r}")
            if value is not None:
                values[name] = value
        if flags.get("secrets") is None:  # never the well-known key without --insecure
            values["secrets"] = configured_secrets(values.get("secret_file"))
        try:
            values["labels"] = parse_labels(values["labels"])
        except ValueError as e:
            raise ConfigError(f"labels (--labels/SOAF_LABELS): {e}") from None
        settings = cls(**values)
        settings.validate()
        # Resolved once here, so no hot path pays for symlink resolution.
        settings.work_root = Path(settings.work_root).expanduser().resolve()
        settings.plugins = Path(settings.plugins).expanduser().resolve()
        return settings

    def validate(self) -> None:
        if self.max_services < 1:
            raise ConfigError(f"max services must be at least 1, got {self.max_services}")
        for name in ("cpus", "memory_mb"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)}")
        if self.core_cpu not in ("auto", "off") and not self.core_cpu.isdigit():
            raise ConfigError(f"core CPU (--core-cpu/SOAF_CORE_CPU) must be auto, off or a "
                              f"CPU number, got {self.core_cpu!r}")
        if self.max_payload < 1024:
            raise ConfigError(f"max payload must be at least 1024 bytes, got {self.max_payload}")
        if not self.node or any(c in self.node for c in " :{}"):
            raise ConfigError(f"node name {self.node!r} must be non-empty without ' :{{}}'")
        if not self.prefix or any(c in self.prefix for c in " {}"):
            raise ConfigError(f"key prefix {self.prefix!r} must be non-empty without ' {{}}'")
        if self.log_max_bytes < 16 * 1024:
            raise ConfigError(f"log max bytes must be at least 16384, got {self.log_max_bytes}")
        if self.log_lines < 1:
            raise ConfigError(f"log lines must be at least 1, got {self.log_lines}")
        for name in ("log_interval", "callback_timeout", "kill_grace", "fetch_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be positive, "
                                  f"got {getattr(self, name)}")
        if self.heartbeat_ttl <= self.heartbeat_interval * 2:
            raise ConfigError("heartbeat TTL must be more than twice the heartbeat interval")
        for name, value in (("gc interval", self.gc_interval), ("max payload age", self.max_payload_age),
                            ("max submit delay", self.max_submit_delay)):
            if value is not None and not value >= 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {value}")
        self.retention.validate()
        if self.reload_poll < 0 or self.reload_debounce < 0:
            raise ConfigError("reload poll and debounce must not be negative")
        if self.reload_timeout <= 0:
            raise ConfigError(f"reload timeout must be positive, got {self.reload_timeout}")
        if not Path(self.plugins).is_dir():
            raise ConfigError(f"plugin directory {self.plugins} does not exist")
