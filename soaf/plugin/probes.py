"""Progress without code: a service says how its progress shows, and the core measures it.

Set the class attribute ``progress`` of a ``ServiceProgramTemplate`` to one probe::

    from soaf import ServiceProgramTemplate, probes

    class Render(ServiceProgramTemplate):
        name = "render"
        progress = probes.files("out/frame_*.png", total=lambda t: t.args["frames"])

* ``probes.files(pattern, total=...)``: the count of files matching ``pattern`` (a glob
  relative to the work dir; ``*`` stays within one directory) over ``total``;
* ``probes.log(regex)``: the last line of the program's stdout that ``regex`` matches:
  two groups read as "done of total" (``r"step (\\d+) of (\\d+)"``), one group as a
  percentage, or as a count over ``total=`` when given;
* ``probes.file(name)``: a file the program rewrites, holding a fraction (``0.4``), a
  percentage (``40%``) or a count (``4/10``), or a count over ``total=``.

``total`` is a number or a function of the template (``lambda t: t.args["chunks"]``).
The core measures the probe before each ``file_change_callback`` (so also for a service
without a handler of its own) and once more before ``after_watch_callback``; a handler
that sets ``service.progress`` itself still may, and wins until the next measurement.
A probe that cannot read anything yet changes nothing; one that raises (a ``total``
function failing) is recorded on the service once, as a callback error, and the
handler's own callbacks still run. Files are read only inside the work dir, never
through a FIFO or a device, and at most ``READ_BYTES`` of each.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soaf.data.workdir import confine
from soaf.errors import PluginError, ValidationError
from soaf.plugin.handler import WatcherHandler
from soaf.protocol.template import ServiceParamTemplate, check_relative

if TYPE_CHECKING:
    from soaf.plugin.service import Service

#: Bytes read from the end of a log (or from a progress file) per measurement.
READ_BYTES = 64 * 1024

Total = float | Callable[[ServiceParamTemplate], Any] | None

_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?:(%)|/\s*([0-9]*\.?[0-9]+))?\s*$")


class Probe:
    """How a service's progress shows in its work dir; ``measure`` gives a fraction."""

    def __init__(self, total: Total) -> None:
        if total is not None and not callable(total) and not _positive(total):
            raise PluginError(f"total must be a positive number or a function of the "
                              f"template, got {total!r}")
        self.total = total

    def measure(self, work_dir: Path, template: ServiceParamTemplate, files: list[str]
                ) -> float | None:
        """The progress (0..1) now, or None when nothing can be read yet."""
        raise NotImplementedError

    def _over_total(self, done: float, template: ServiceParamTemplate) -> float | None:
        total = self.total(template) if callable(self.total) else self.total
        if not _positive(total):
            raise PluginError(f"the total of {self!r} is {total!r}, not a positive number")
        return done / float(total)  # type: ignore[arg-type]  # _positive: a number


class _Files(Probe):
    def __init__(self, pattern: str, total: Total) -> None:
        if total is None:
            raise PluginError(f"probes.files({pattern!r}) needs total= (a number, or a "
                              "function of the template)")
        _check_name("pattern", pattern)
        super().__init__(total)
        self.pattern = pattern
        # One expression per path component, so `*` never crosses a `/`.
        self.parts = [re.compile(fnmatch.translate(part)).match for part in pattern.split("/")]

    def measure(self, work_dir: Path, template: ServiceParamTemplate, files: list[str]
                ) -> float | None:
        depth = len(self.parts)
        done = sum(1 for f in files if f.count("/") + 1 == depth and all(
            match(part) for match, part in zip(self.parts, f.split("/"))))
        return self._over_total(done, template)

    def __repr__(self) -> str:
        return f"probes.files({self.pattern!r})"


class _Log(Probe):
    def __init__(self, pattern: str, stream: str, total: Total) -> None:
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise PluginError(f"probes.log({pattern!r}): not a regular expression: {e}") from e
        if not 1 <= self.regex.groups <= 2:
            raise PluginError(f"probes.log({pattern!r}) needs one group (a percentage, or a "
                              "count over total=) or two (done, total)")
        if stream not in ("stdout", "stderr"):
            raise PluginError(f"probes.log: stream must be 'stdout' or 'stderr', got {stream!r}")
        super().__init__(total)
        self.stream = stream

    def measure(self, work_dir: Path, template: ServiceParamTemplate, files: list[str]
                ) -> float | None:
        text = _read_tail(work_dir, f"{self.stream}.log")
        for line in reversed(text.splitlines()):
            found = self.regex.search(line)
            if found is None:
                continue
            numbers = [n for g in found.groups() if (n := _number(g)) is not None]
            if len(numbers) != self.regex.groups:
                continue
            if len(numbers) == 2:
                return numbers[0] / numbers[1] if numbers[1] else None
            if self.total is not None:
                return self._over_total(numbers[0], template)
            return numbers[0] / 100
        return None

    def __repr__(self) -> str:
        return f"probes.log({self.regex.pattern!r})"


class _File(Probe):
    def __init__(self, name: str, total: Total) -> None:
        _check_name("name", name)
        super().__init__(total)
        self.name = name

    def measure(self, work_dir: Path, template: ServiceParamTemplate, files: list[str]
                ) -> float | None:
        found = _COUNT.match(_read_tail(work_dir, self.name))
        if found is None:
            return None
        value, percent, over = found.groups()
        if percent:
            return float(value) / 100
        if over:
            return float(value) / float(over) if float(over) else None
        if self.total is not None:
            return self._over_total(float(value), template)
        return float(value)

    def __repr__(self) -> str:
        return f"probes.file({self.name!r})"


def files(pattern: str, *, total: Total) -> Probe:
    """Progress = the number of files matching ``pattern`` / ``total``."""
    return _Files(pattern, total)


def log(pattern: str, *, stream: str = "stdout", total: Total = None) -> Probe:
    """Progress from the last line of the program's ``stream`` that ``pattern`` matches."""
    return _Log(pattern, stream, total)


def file(name: str, *, total: Total = None) -> Probe:
    """Progress from the number in the work dir's file ``name``."""
    return _File(name, total)


# -- how the core applies a probe ------------------------------------------------------------

def check_progress(program: type) -> None:
    """PluginError when a program class's ``progress`` is set but is not a probe."""
    probe = getattr(program, "progress", None)
    if probe is not None and not isinstance(probe, Probe):
        raise PluginError(f"{program.__name__}.progress must be a probe (soaf.probes.files, "
                          f".log or .file), got {type(probe).__name__}")


def probed(handler: type[WatcherHandler], probe: Probe) -> type[WatcherHandler]:
    """``handler`` with ``probe`` measured before its file and after-watch callbacks."""

    class Probed(handler):  # type: ignore[valid-type,misc]
        _probe_failed = False  # recorded once per run, not every interval

        def file_change_callback(self, service: Service, files: list[str]) -> Any:
            self._measure(service, files)
            return super().file_change_callback(service, files)

        def after_watch_callback(self, service: Service, files: list[str]) -> None:
            if service.exit is not None:  # the program ran: take its last word
                self._measure(service, files)
            super().after_watch_callback(service, files)

        def _measure(self, service: Service, files: list[str]) -> None:
            try:
                value = probe.measure(service.work_dir, service.template, files)
            except Exception as e:
                if not self._probe_failed:
                    self._probe_failed = True
                    service.record_callback_error(
                        f"progress probe {probe!r} raised {type(e).__name__}: {e}",
                        traceback.format_exc())
                return
            if value is not None:
                service.progress = value

    Probed.__name__ = Probed.__qualname__ = handler.__name__
    Probed.__module__ = handler.__module__
    return Probed


# -- reading the work dir -------------------------------------------------------------------------

def _check_name(what: str, name: str) -> None:
    try:
        check_relative(what, name)
    except ValidationError as e:
        raise PluginError(f"probe {what}: {e}") from e


def _read_tail(work_dir: Path, name: str) -> str:
    """The last READ_BYTES of a regular file in the work dir; '' when it is not there."""
    try:
        path = confine(work_dir, name)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except (ValidationError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
            raise
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return ""
        start = max(0, info.st_size - READ_BYTES)
        data = os.pread(fd, READ_BYTES, start)
    finally:
        os.close(fd)
    if start:
        data = data.split(b"\n", 1)[-1]  # a partial first line is no line
    return data.replace(b"\0", b"").decode(errors="replace")


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _positive(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and value == value and 0 < value < float("inf"))
