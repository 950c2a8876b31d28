"""What a run needs from the core, as small interfaces, and what it is given.

A run never sees the core. It is handed ``Engines``: the settings and the few engines it
uses (the state writer, the reaper, the log keeper, the limit enforcer) plus the callables
the core answers for it. Each engine is typed here by the one or two methods a run calls,
so the run package depends on nothing above it (the core's classes satisfy these
protocols structurally).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from soaf.config import Settings
from soaf.data.handoff import Lookup
from soaf.process.cgroup import Cgroups
from soaf.process.reaper import Reaper
from soaf.protocol.state import Change, ServiceRecord
from soaf.protocol.template import ServiceParamTemplate
from soaf.run.control import CallGuard, Halt
from soaf.run.journal import RunJournal
from soaf.run.policy import Policy


class ChangeSink(Protocol):
    """The state writer: takes changes of records, writes them in order."""

    def put(self, change: Change) -> None: ...


class LogSink(Protocol):
    """The log keeper: caps a program's output files and ships their lines."""

    def add(self, service_id: str, attempt: int, paths: dict[str, Path]) -> Any: ...

    def finish(self, handle: Any) -> dict[str, Any]: ...


class Supervised(Protocol):
    """What the limit enforcer drives: one running service. A ``fast`` one (its program
    has a memory limit) is ticked every ``FAST_INTERVAL`` (soaf.core.enforcer)."""

    service_id: str

    @property
    def fast(self) -> bool: ...

    def tick(self, now: float) -> None: ...


class Enforcer(Protocol):
    """The core's limit enforcer: ticks every running service, at once when poked."""

    def add(self, run: Supervised) -> None: ...

    def remove(self, run: Supervised) -> None: ...

    def poke(self) -> None: ...


class ResultStore(Protocol):
    """The core's result cache in Redis (soaf.core.results; see soaf.run.cached)."""

    def find(self, service: str, key: str) -> ServiceRecord | None: ...

    def remember(self, service: str, key: str, service_id: str) -> None: ...


def _nothing(run: Any) -> None:
    return None


@dataclass(frozen=True)
class Engines:
    """The core's machinery a run uses; built once per core and shared by every run."""

    settings: Settings
    writer: ChangeSink
    reaper: Reaper
    keeper: LogSink | None = None
    enforcer: Enforcer | None = None
    #: Another service's record, for ``soaf://`` inputs (None: such inputs fail).
    lookup: Lookup | None = None
    #: False if a newer attempt of the run's service exists elsewhere (asked before
    #: after_watch_callback); None: always current.
    still_current: Callable[[Any], bool] | None = None
    #: The core's delegated cgroup v2 (soaf.process.cgroup), None where limits are polled.
    cgroups: Cgroups | None = None
    #: Called from the run's thread when the run is over (final queued, or left for recovery).
    on_done: Callable[[Any], None] = _nothing
    #: The result cache (None: no template is answered from it).
    results: ResultStore | None = None


@dataclass(frozen=True)
class PluginClasses:
    """The plugin classes a run uses, from the plugin version it started with."""

    program_cls: Any
    handler_cls: Any
    version: str
    #: The plugin version's full content digest (part of result cache keys).
    digest: str = ""


class AttemptHost(Protocol):
    """What an attempt needs of its run (soaf.run.service_run.ServiceRun). The attempt
    reports through these methods and returns its outcome; it never writes into the run."""

    template: ServiceParamTemplate
    engines: Engines
    plugin: PluginClasses
    policy: Policy
    halt: Halt
    guard: CallGuard

    @property
    def last_state(self) -> str | None: ...

    def emit(self, values: dict[str, Any], *, attempt: int | None = None,
             final: bool = False, with_building: bool = False) -> None: ...

    def new_journal(self, number: int, work_dir: Path | None) -> RunJournal: ...

    def journal_step(self, step: str, *, save: bool = False, **info: Any) -> dict[str, Any]: ...

    def journaled(self, name: str, handler: object | None = None
                  ) -> AbstractContextManager[None]: ...

    def mark_collected(self) -> None: ...

    def logs_finished(self, shipped: bool) -> None: ...

    def resolve(self, ref: str) -> Path | str: ...

    def still_current(self) -> bool: ...
