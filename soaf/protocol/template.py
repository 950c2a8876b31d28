"""ServiceParamTemplate: what a user asks a core to run, with its validation.

A template is a plain dataclass. Users may subclass it (even in a script's ``__main__``)
to add attributes; the subclass travels by value inside the dill pickle, so plugins
see the extra attributes. ``validate()`` runs on the client before sending and again
on the core, and names the bad field.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from soaf.errors import ValidationError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")
#: How local inputs are staged: copied, hard-linked, or symlinked (never moved).
INPUT_MODES = ("copy", "link", "symlink")
#: The first path component soaf keeps for itself at the top of the work root.
RESERVED_WORK_NAME = ".soaf"
#: Names at the top of the work root starting with this are soaf's own (``.soaf/`` with
#: its run markers, ``.soaf-runs/`` with the journals and exit files).
RESERVED_WORK_PREFIX = ".soaf"
#: Files soaf writes into every work dir itself: no input may take their names.
RESERVED_INPUT_NAMES = frozenset({"stdout.log", "stderr.log"})
#: Upper bounds of the numeric fields: finite, and far past any real use.
MAX_SECONDS = 366 * 86400.0
MAX_MEMORY_MB = 1 << 30  # 1 PiB
MAX_RETRIES, MAX_CPUS = 100, 1 << 20
MAX_LOST = 100  # lost attempts a template may allow: a crash loop must end
MIN_WATCH_INTERVAL, MIN_RETRY_BACKOFF = 0.05, 0.1
#: Output targets that live in the core's own process: nobody else could read them.
IN_PROCESS_SCHEMES = frozenset({"memory"})
#: The scheme of a reference to another service's output: ``soaf://<service_id>/<name>``.
REF_SCHEME = "soaf://"


def new_service_id() -> str:
    """A unique, URL- and key-safe service id."""
    return uuid.uuid4().hex


def is_url(value: str) -> bool:
    return bool(_URL.match(value))


def check_relative(field_name: str, value: Any) -> None:
    """Refuse a name that could leave the directory it is resolved in, or that names the
    directory itself. Symlinks are followed later, by ``workdir.confine``."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field_name, f"must be a non-empty string, got {_show(value)}")
    if "\x00" in value:
        raise ValidationError(field_name, f"{value!r} contains a NUL byte")
    if _has_control(value):
        raise ValidationError(field_name, f"{value!r} contains a control character")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise ValidationError(field_name, f"{value!r} is absolute; it must stay inside the work dir")
    if ".." in path.parts:
        raise ValidationError(field_name, f"{value!r} contains '..'; it must stay inside the work dir")
    if not path.parts:
        raise ValidationError(field_name, f"{value!r} names the directory itself, not an entry in it")


def _has_control(value: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value)


def _show(value: Any) -> str:
    """A short, safe description of a bad value for an error message."""
    try:
        text = repr(value)
    except Exception:
        text = "<unprintable>"
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


@dataclass
class ServiceParamTemplate:
    """A request to run one service.

    Attributes:
        service: the service name a plugin serves (``WordCount.name``).
        service_id: unique id; generated when not given. Submitting an id twice runs it once.
        work_path: a sub-directory of the core's work root; templates naming the same one
            share it. Default: a directory of its own named after ``service_id``.
        input_files: paths or URLs the default ``prepare_input_file`` stages into the
            work dir; a mapping form ``{name_in_work_dir: source}`` chooses the names.
            ``soaf://<service_id>/<name>`` names another service's output (see
            ``soaf.output_ref``). See docs/data.md.
        input_mode: how local inputs are staged: ``"copy"`` (default), ``"link"`` (hard
            link, falling back to a copy across file systems) or ``"symlink"``.
        output_files: names (globs allowed) the program must write; any missing one
            fails the service after the program exits.
        optional_outputs: names (globs allowed) collected when present, never required.
        output_target: a directory (absolute path on the core's machine) or URL the
            outputs are copied to after a successful run; ``{service_id}`` and
            ``{service}`` in it are replaced.
        args: free arguments for the plugin (``command()`` decides how to use them).
        env: extra environment variables for the program (strings only).
        watch_interval: seconds between ``file_change_callback`` calls.
        timeout: seconds the program may run; None uses the service's default.
        retries: further attempts after a failed or timed-out one (0: none); None uses
            the service's default.
        retry_backoff: seconds before the first retry (doubled for each further one);
            None uses the service's default.
        max_memory_mb: resident memory (MiB) the program may use before it is killed;
            None uses the service's default.
        max_lost: attempts that may be lost (their core died, or stopped without
            draining) before the service ends ``failed`` (failure ``lost``); lost attempts
            never count against ``retries``. None uses the service's default (3).
        cpus: CPUs the service needs while it runs (e.g. ``2`` or ``0.5``); a core starts
            it only while that many of its ``--cpus`` are free. None uses the service's
            default (none: it counts only against the core's service slots).
        memory_mb: memory (MiB) the service needs while it runs, counted against the
            core's ``--memory-mb`` like ``cpus``. None uses the service's default (none).
        cache: answer it from an earlier succeeded run with the same service, plugin
            code, args, env, output spec and input content (docs/cache.md).
        priority: -1000..1000 (default 0); cores take higher first (docs/protocol.md, Queues).
        signed_at: set by ``dumps`` when it signs the template (Unix time): a core refuses
            a payload older than ``SOAF_MAX_PAYLOAD_AGE`` whose record is gone (a replay).
    """

    service: str = ""
    service_id: str = field(default_factory=new_service_id)
    work_path: str | None = None
    input_files: list[str] | dict[str, str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)
    # Fields added after the first release default to immutable values, so a template
    # pickled by an older client (without them) still has them through the class.
    input_mode: str = "copy"
    optional_outputs: list[str] | tuple[str, ...] = ()
    output_target: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    watch_interval: float = 1.0
    timeout: float | None = None
    retries: int | None = None
    retry_backoff: float | None = None
    max_memory_mb: float | None = None
    max_lost: int | None = None
    cpus: float | None = None
    memory_mb: float | None = None
    cache: bool = False
    signed_at: float | None = None
    priority: int = 0

    def validate(self) -> None:
        """Raise ValidationError naming the first field that cannot be accepted.

        Only ValidationError comes out, whatever the fields hold: a field a subclass
        deleted is "missing", one that raises when read or checked says so. The core
        runs this base-class check itself (a subclass's override cannot skip it), then
        the subclass's own ``validate`` if it has one.
        """
        for name, check in _CHECKS:
            try:
                value = getattr(self, name)
            except AttributeError:
                raise ValidationError(name, "is missing (a subclass deleted it or never set it)")
            except Exception as e:
                raise ValidationError(name, f"reading it raised {type(e).__name__}: {e}")
            try:
                check(self, value)
            except ValidationError:
                raise
            except Exception as e:
                raise ValidationError(name, f"cannot be checked: {type(e).__name__}: {e}")

    def input_names(self) -> list[str]:
        """Names the inputs will have inside the work dir."""
        if isinstance(self.input_files, Mapping):
            return list(self.input_files)
        if not isinstance(self.input_files, (list, tuple)):
            raise ValidationError("input_files", "must be a list of paths/URLs or a dict")
        names = []
        for source in self.input_files:
            if not isinstance(source, str) or not source:
                raise ValidationError("input_files", f"entry {source!r} must be a string")
            base = source.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
            names.append(base)
        return names

    def input_sources(self) -> dict[str, str]:
        """``{name in work dir: source path or URL}``."""
        if isinstance(self.input_files, Mapping):
            return dict(self.input_files)
        return dict(zip(self.input_names(), self.input_files))

    def summary(self) -> dict[str, Any]:
        """The public, JSON-friendly fields (subclass extras included when simple)."""
        out: dict[str, Any] = {}
        for key, value in vars(self).items():
            if isinstance(value, (str, int, float, bool, type(None), list, dict, tuple)):
                out[key] = value
        return out


def output_ref(service_id: str, name: str) -> str:
    """A source for ``input_files`` naming output ``name`` of service ``service_id``.

    A core on the producer's host links the file from the producer's work dir (no
    copy); elsewhere it fetches the copy the producer uploaded to its ``output_target``.
    """
    ref = f"{REF_SCHEME}{service_id}/{name}"
    parse_ref(ref)
    return ref


def parse_ref(ref: str) -> tuple[str, str]:
    """``(service_id, name)`` of a ``soaf://`` reference, or ValidationError."""
    if not isinstance(ref, str) or not ref.startswith(REF_SCHEME):
        raise ValidationError("input_files", f"{ref!r} is not a {REF_SCHEME}<service_id>/<name> reference")
    service_id, _, name = ref[len(REF_SCHEME):].partition("/")
    if not _ID.match(service_id):
        raise ValidationError("input_files", f"{ref!r} names no valid service id")
    check_relative("input_files", name)
    return service_id, name


def validate_template(template: ServiceParamTemplate) -> None:
    """What clients and cores run: the base class's checks, which a subclass that
    overrides ``validate()`` cannot skip, then the subclass's own ``validate()``."""
    ServiceParamTemplate.validate(template)
    if type(template).validate is not ServiceParamTemplate.validate:
        template.validate()


def _check_service(t: ServiceParamTemplate, value: Any) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValidationError(
            "service", f"must be a service name (letters, digits, '_.-'), got {_show(value)}")


def _check_service_id(t: ServiceParamTemplate, value: Any) -> None:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValidationError(
            "service_id", f"must be 1-128 letters, digits or '_.-', got {_show(value)}")


def _check_work_path(t: ServiceParamTemplate, value: Any) -> None:
    if value is not None:
        check_relative("work_path", value)
        if PurePosixPath(value).parts[0].startswith(RESERVED_WORK_PREFIX):
            raise ValidationError(
                "work_path", f"{value!r}: names starting with {RESERVED_WORK_PREFIX!r} at the "
                             "top of the work root are soaf's own")


def _check_input_files(t: ServiceParamTemplate, value: Any) -> None:
    if isinstance(value, Mapping):
        for source in value.values():
            if not isinstance(source, str) or not source:
                raise ValidationError("input_files", f"source {_show(source)} must be a string")
    for name in ServiceParamTemplate.input_names(t):
        check_relative("input_files", name)
        top = PurePosixPath(name).parts[0]
        if top in RESERVED_INPUT_NAMES or top.startswith(RESERVED_WORK_PREFIX):
            raise ValidationError("input_files", f"{name!r} is a name soaf writes in the work "
                                                 "dir itself")
    for source in ServiceParamTemplate.input_sources(t).values():
        if source.startswith(REF_SCHEME):
            parse_ref(source)


def _check_input_mode(t: ServiceParamTemplate, value: Any) -> None:
    if value not in INPUT_MODES:
        raise ValidationError(
            "input_mode", f"must be one of {', '.join(INPUT_MODES)}, got {_show(value)}")


def _check_patterns(field_name: str) -> Callable[[ServiceParamTemplate, Any], None]:
    """The check of a list of names or globs inside the work dir (``output_files``,
    ``optional_outputs``)."""
    def check(t: ServiceParamTemplate, value: Any) -> None:
        if not isinstance(value, (list, tuple)):
            raise ValidationError(field_name, f"must be a list of names or globs, got "
                                              f"{_show(value)}")
        for name in value:
            check_relative(field_name, name)
    return check


def _check_output_target(t: ServiceParamTemplate, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ValidationError("output_target", f"must be a URL or directory, got {_show(value)}")
    if not is_url(value) and not PurePosixPath(value).is_absolute():
        raise ValidationError("output_target", f"{value!r} must be a URL or an absolute directory")
    if is_url(value) and value.split("://", 1)[0].lower() in IN_PROCESS_SCHEMES:
        raise ValidationError("output_target", f"{value!r} lives in the core's own memory; "
                                               "nobody else could read it")


def _check_args(t: ServiceParamTemplate, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ValidationError("args", f"must be a dict, got {_show(value)}")


def _check_env(t: ServiceParamTemplate, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ValidationError("env", f"must be a dict of strings, got {_show(value)}")
    for key, item in value.items():
        if not isinstance(key, str) or not key or "=" in key or "\x00" in key:
            raise ValidationError("env", f"variable name {_show(key)} is not valid")
        if not isinstance(item, str):
            raise ValidationError("env", f"value of {key} must be a string, got {_show(item)}")
        if "\x00" in item:
            raise ValidationError("env", f"value of {key} contains a NUL byte")


def _check_watch_interval(t: ServiceParamTemplate, value: Any) -> None:
    if not _number_in(value, MIN_WATCH_INTERVAL, MAX_SECONDS):
        raise ValidationError("watch_interval", f"must be a positive number of seconds from "
                                                f"{MIN_WATCH_INTERVAL:g} to {MAX_SECONDS:.0f}, "
                                                f"got {_show(value)}")


def _check_timeout(t: ServiceParamTemplate, value: Any) -> None:
    if value is not None and not (_positive_number(value) and value <= MAX_SECONDS):
        raise ValidationError("timeout", f"must be a positive number of seconds or None, got "
                                         f"{_show(value)} (at most {MAX_SECONDS:.0f})")


def _check_retries(t: ServiceParamTemplate, value: Any) -> None:
    if value is not None and not _whole_in(value, 0, MAX_RETRIES):
        raise ValidationError("retries", f"must be a whole number >= 0 (at most {MAX_RETRIES}) "
                                         f"or None, got {_show(value)}")


def _check_max_lost(t: ServiceParamTemplate, value: Any) -> None:
    if value is not None and not _whole_in(value, 0, MAX_LOST):
        raise ValidationError("max_lost", f"must be a whole number from 0 to {MAX_LOST} or "
                                          f"None, got {_show(value)}")


def _check_retry_backoff(t: ServiceParamTemplate, value: Any) -> None:
    if value is not None and not _number_in(value, MIN_RETRY_BACKOFF, MAX_SECONDS):
        raise ValidationError("retry_backoff", f"must be a number of seconds from "
                                               f"{MIN_RETRY_BACKOFF:g} to {MAX_SECONDS:.0f} or "
                                               f"None, got {_show(value)}")


def _check_positive(field_name: str, what: str, high: float
                    ) -> Callable[[ServiceParamTemplate, Any], None]:
    """The check of an optional positive number up to ``high`` (memory, CPUs)."""
    def check(t: ServiceParamTemplate, value: Any) -> None:
        if value is not None and not (_positive_number(value) and value <= high):
            raise ValidationError(field_name, f"must be a positive {what} or None, got "
                                              f"{_show(value)} (at most {high})")
    return check


def _check_cache(t: ServiceParamTemplate, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValidationError("cache", f"must be True or False, got {_show(value)}")


def _check_priority(t: ServiceParamTemplate, value: Any) -> None:
    if not _whole_in(value, -1000, 1000):
        raise ValidationError("priority", f"must be a whole number from -1000 to 1000, got {_show(value)}")


#: Every field and its check, in the order errors are reported.
_CHECKS: list[tuple[str, Callable[[ServiceParamTemplate, Any], None]]] = [
    ("service", _check_service), ("service_id", _check_service_id),
    ("work_path", _check_work_path), ("input_files", _check_input_files),
    ("input_mode", _check_input_mode), ("output_files", _check_patterns("output_files")),
    ("optional_outputs", _check_patterns("optional_outputs")),
    ("output_target", _check_output_target), ("args", _check_args), ("env", _check_env),
    ("watch_interval", _check_watch_interval), ("timeout", _check_timeout),
    ("retries", _check_retries), ("retry_backoff", _check_retry_backoff),
    ("max_memory_mb", _check_positive("max_memory_mb", "number", MAX_MEMORY_MB)),
    ("max_lost", _check_max_lost), ("cpus", _check_positive("cpus", "number of CPUs", MAX_CPUS)),
    ("memory_mb", _check_positive("memory_mb", "number of MiB", MAX_MEMORY_MB)),
    ("cache", _check_cache), ("priority", _check_priority),
]


def _positive_number(value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def _whole_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number_in(value: Any, low: float, high: float) -> bool:
    return _positive_number(value) and low <= value <= high
