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
from collections.abc import Mapping
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
#: The scheme of a reference to another service's output: ``soaf://<service_id>/<name>``.
REF_SCHEME = "soaf://"


def new_service_id() -> str:
    """A unique, URL- and key-safe service id."""
    return uuid.uuid4().hex


def is_url(value: str) -> bool:
    return bool(_URL.match(value))


def check_relative(field_name: str, value: str) -> None:
    """Refuse a path that could leave the directory it is resolved in."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field_name, f"must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise ValidationError(field_name, f"{value!r} contains a NUL byte")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise ValidationError(field_name, f"{value!r} is absolute; it must stay inside the work dir")
    if ".." in path.parts:
        raise ValidationError(field_name, f"{value!r} contains '..'; it must stay inside the work dir")


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
        retries: further attempts after a failed one (0: none).
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
    retries: int = 0

    def validate(self) -> None:
        """Raise ValidationError naming the first field that cannot be accepted."""
        if not isinstance(self.service, str) or not _NAME.match(self.service):
            raise ValidationError(
                "service", f"must be a service name (letters, digits, '_.-'), got {self.service!r}"
            )
        if not isinstance(self.service_id, str) or not _ID.match(self.service_id):
            raise ValidationError(
                "service_id", f"must be 1-128 letters, digits or '_.-', got {self.service_id!r}"
            )
        if self.work_path is not None:
            check_relative("work_path", self.work_path)
            if PurePosixPath(self.work_path).parts[0] == RESERVED_WORK_NAME:
                raise ValidationError(
                    "work_path", f"{RESERVED_WORK_NAME!r} at the top of the work root is soaf's own"
                )
        for name in self.input_names():
            check_relative("input_files", name)
        for source in self.input_sources().values():
            if not isinstance(source, str) or not source:
                raise ValidationError("input_files", f"source {source!r} must be a string")
            if source.startswith(REF_SCHEME):
                parse_ref(source)
        if self.input_mode not in INPUT_MODES:
            raise ValidationError(
                "input_mode", f"must be one of {', '.join(INPUT_MODES)}, got {self.input_mode!r}"
            )
        for name in ("output_files", "optional_outputs"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValidationError(name, "must be a list of names or globs")
            for pattern in value:
                check_relative(name, pattern)
        if self.output_target is not None:
            target = self.output_target
            if not isinstance(target, str) or not target or "\x00" in target:
                raise ValidationError("output_target", f"must be a URL or directory, got {target!r}")
            if not is_url(target) and not PurePosixPath(target).is_absolute():
                raise ValidationError(
                    "output_target", f"{target!r} must be a URL or an absolute directory"
                )
        if not isinstance(self.args, Mapping):
            raise ValidationError("args", f"must be a dict, got {type(self.args).__name__}")
        if not isinstance(self.env, Mapping):
            raise ValidationError("env", f"must be a dict, got {type(self.env).__name__}")
        for key, value in self.env.items():
            if not isinstance(key, str) or not key or "=" in key or "\x00" in key:
                raise ValidationError("env", f"variable name {key!r} is not valid")
            if not isinstance(value, str) or "\x00" in value:
                raise ValidationError("env", f"value of {key} must be a string, got {value!r}")
        if not _positive_number(self.watch_interval):
            raise ValidationError(
                "watch_interval", f"must be a positive number, got {self.watch_interval!r}"
            )
        if self.timeout is not None and not _positive_number(self.timeout):
            raise ValidationError("timeout", f"must be a positive number, got {self.timeout!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValidationError("retries", f"must be a whole number >= 0, got {self.retries!r}")

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


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
