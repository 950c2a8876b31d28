"""Service: the live view of one running service that plugins' callbacks receive.

Everything set here (progress, message, custom fields) is queued for the state writer
and lands in the service's Redis record and event stream, readable from any client.
It holds no Redis connection itself, so callbacks never block on Redis.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soaf.errors import ValidationError
from soaf.plugin.eta import EtaEstimate
from soaf.protocol.template import ServiceParamTemplate

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")

Emit = Callable[[dict[str, Any]], None]


class Service:
    """One service run: its id, template, work dir, and a way to report on it."""

    def __init__(
        self,
        template: ServiceParamTemplate,
        work_dir: Path,
        *,
        attempt: int,
        node: str,
        plugin_version: str,
        emit: Emit,
    ) -> None:
        self.template = template
        self.work_dir = work_dir
        self.attempt = attempt
        self.node = node
        self.plugin_version = plugin_version
        self._emit = emit
        self._progress: float | None = None
        self._eta = EtaEstimate()
        self._message: str | None = None
        self.fields: dict[str, Any] = {}
        self.inputs: list[dict[str, Any]] = []
        self.outputs: list[dict[str, Any]] = []
        self.stop_requested = threading.Event()
        self.callback_errors = 0
        #: The last callback error's text (``"file_change_callback raised KeyError: 'x'"``).
        self.last_callback_error: str | None = None
        #: How often ``progress`` was set; the attempt compares it around
        #: ``after_watch_callback`` to know whether the handler had the last word.
        self.progress_sets = 0
        #: True when a restarted core re-adopted the running program: the handler is a new
        #: instance, ``before_watch_callback`` runs again, and ``fields``, ``progress`` and
        #: ``message`` hold what the previous core had written.
        self.recovered = False
        #: How the program ended (``soaf.process.spawn.Exit``: exit_code, signal, wall_time ...),
        #: set before ``after_watch_callback`` runs; None if it never started.
        self.exit: Any = None
        #: What this attempt comes to as far as soaf knows before ``after_watch_callback``:
        #: ``succeeded``, ``failed``, ``timed_out``, ``cancelled`` or ``interrupted``.
        self.outcome: str | None = None

    @property
    def service_id(self) -> str:
        return self.template.service_id

    @property
    def name(self) -> str:
        return self.template.service

    @property
    def progress(self) -> float | None:
        return self._progress

    @progress.setter
    def progress(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValidationError("progress", f"must be a number between 0 and 1, got {value!r}")
        value = min(1.0, max(0.0, float(value)))
        self.progress_sets += 1
        if value != self._progress:
            self._progress = value
            # Every progress has its ETA (Unix time, None until a rate is known).
            self._emit({"progress": value, "eta": self._eta.update(value)})

    @property
    def message(self) -> str | None:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        self._message = str(value)
        self._emit({"message": self._message})

    def set(self, **fields: Any) -> None:
        """Store custom fields on the record (JSON-able values); readable as ``record.fields``."""
        changed: dict[str, Any] = {}
        for key, value in fields.items():
            if not _FIELD.match(key):
                raise ValidationError("field", f"custom field name {key!r} is not valid")
            if self.fields.get(key, _MISSING) != value:
                self.fields[key] = value
                changed["f:" + key] = value
        if changed:
            self._emit(changed)

    def record_inputs(self, inputs: list[dict[str, Any]]) -> None:
        """Record what was staged into the work dir (``inputs``: name, source, size ...)."""
        self.inputs = list(inputs)
        self._emit({"inputs": self.inputs})

    def record_outputs(self, outputs: list[dict[str, Any]], *, target: str | None = None) -> None:
        """Record the collected outputs (``outputs``: name, size, sha256, url) and where
        they were copied (``output_target``)."""
        self.outputs = list(outputs)
        values: dict[str, Any] = {"outputs": self.outputs}
        if target is not None:
            values["output_target"] = target
        self._emit(values)

    def record_skipped_outputs(self, notes: list[str]) -> None:
        """Record why files the output patterns met were not collected (``outputs_skipped``)."""
        self._emit({"outputs_skipped": list(notes)})

    def restore(self, fields: dict[str, Any], progress: float | None, message: str | None) -> None:
        """Take over what an earlier core wrote for this run, without writing it again."""
        self.fields.update(fields)
        self._progress = progress
        self._message = message
        self.recovered = True

    def record_callback_error(self, text: str, tb: str) -> None:
        """Record a callback's exception on the record; the service carries on."""
        self.callback_errors += 1
        self.last_callback_error = text
        self._emit({"callback_error": text, "callback_traceback": tb,
                    "callback_errors": self.callback_errors})

    def stop(self) -> None:
        """Stop watching early, as returning ``soaf.STOP`` from a callback does."""
        self.stop_requested.set()

    def __repr__(self) -> str:
        return f"<Service {self.name} {self.service_id} attempt {self.attempt}>"


_MISSING = object()
