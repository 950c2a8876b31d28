"""Everything before a program starts: its work dir, handler, program, build, inputs, command.

``take_work_dir`` makes (or, for a retry, sets aside and makes again) the attempt's work dir
under the work root's shared lock, with the run marker written first, so the sweep
(soaf.data.retention) never removes it under the attempt. ``Preparation`` then makes the
plugin calls in order, each through the attempt's ``call`` (soaf.run.control.CallGuard), and
checks for a cancel or a core stop between them. The handler is handed over the moment it
exists (``on_handler``): ``after_watch_callback`` runs even when a later step fails, or
hangs and another thread finishes the attempt. A step whose class keeps soaf's base
method, which runs no plugin code and waits on nothing (``plain_steps``), is called
directly: the guard is there for code that may hang, and this cannot.
"""

from __future__ import annotations

import inspect
import logging
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soaf.config import Settings
from soaf.data import markers, workdir
from soaf.data.staging import StageContext
from soaf.errors import ProgramError, SoafError, TransferStopped, ValidationError
from soaf.plugin.handler import WatcherHandler
from soaf.plugin.program import ServiceProgramTemplate
from soaf.plugin.service import Service
from soaf.protocol.state import State
from soaf.protocol.template import ServiceParamTemplate
from soaf.run.control import Halt, Orphaned
from soaf.run.outcome import INTERRUPTED, Outcome
from soaf.run.ports import AttemptHost

log = logging.getLogger(__name__)


class Halted(Exception):
    """A cancel or a core stop arrived before the program started."""


class PhaseError(Exception):
    """Plugin code raised in a phase; carries the phase and the traceback."""

    def __init__(self, phase: str, error: BaseException) -> None:
        super().__init__(str(error))
        self.phase = phase
        self.error = error


def phase_failed(service_id: str, e: PhaseError) -> Outcome:
    """The outcome of an attempt whose plugin code raised in a phase."""
    err = e.error
    log.warning("service %s failed in %s: %s", service_id, e.phase, err,
                exc_info=(type(err), err, err.__traceback__)
                if not isinstance(err, SoafError) else None)
    failure = "start" if isinstance(err, ProgramError) else "plugin"
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return Outcome(State.FAILED.value, failure, f"{e.phase}: {type(err).__name__}: {err}",
                   {"failed_in": e.phase, "traceback": tb})


def halted(halt: Halt, step: str, note: str = "") -> Outcome:
    """The outcome of an attempt stopped by a cancel or a core stop before its program
    started (``step``: the plugin call it had reached)."""
    where = {"build": " while building", "prepare_input_file": " while preparing its input",
             }.get(step, "")
    if halt.interrupt_requested:
        return Outcome(INTERRUPTED, error=f"core stopped{where}, before it started{note}")
    return Outcome(State.CANCELLED.value, error=f"cancelled{where}, before it started{note}")


def stopped_collecting(halt: Halt) -> Outcome:
    """The outcome of an attempt stopped by a cancel or a core stop while its outputs
    were collected."""
    if halt.interrupt_requested:
        return Outcome(INTERRUPTED, error="core stopped while the outputs were collected")
    return Outcome(State.CANCELLED.value, error="cancelled while the outputs were collected")


def _stopped(error: BaseException) -> bool:
    """A staging error that is a stop request (a plugin may wrap it in its own error)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, TransferStopped):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def outputs_escape(settings: Settings, work_dir: Path,
                   template: ServiceParamTemplate) -> str | None:
    """Why the output names now lead out of the work dir (the program may have made
    links), or None when they stay inside."""
    try:
        workdir.check_names(settings.work_root, work_dir, template, outputs_only=True)
    except ValidationError as e:
        log.warning("service %s: %s", template.service_id, e)
        return f"after the run: {e}"
    return None


def take_work_dir(settings: Settings, template: ServiceParamTemplate, number: int, *,
                  policy: str, last_state: str | None) -> tuple[Path, markers.Marker]:
    """Attempt ``number``'s work dir and its run marker."""
    root = settings.work_root
    if policy not in ("fresh", "reuse"):
        raise SoafError(f"work_dir_policy must be 'fresh' or 'reuse', got {policy!r}")
    if policy == "fresh" and number > 1 and not template.work_path:
        path = workdir.work_dir_for(root, template)
        moved = workdir.set_aside(path, f"attempt{number - 1}")
        if moved is not None:
            markers.mark_set_aside(root, moved.relative_to(root).as_posix(),
                                   last_state or State.FAILED.value)
            log.info("service %s: attempt %d runs in a fresh dir; the last one is at %s",
                     template.service_id, number, moved)
    # Marker first, under the shared lock: a sweep sees the dir as in use from the
    # moment it exists.
    with markers.work_root_lock(root, exclusive=False):
        marker = markers.mark_started(root, template.service_id,
                                      template.work_path or template.service_id)
        return workdir.create(root, template), marker


def make_program(host: AttemptHost, number: int, work_dir: Path, service: Service) -> Any:
    """The service's program object for one attempt, wired to its service and staging."""
    settings = host.engines.settings
    program = host.plugin.program_cls(host.template, work_dir, attempt=number,
                                      plugin_root=settings.plugins)
    program.service = service
    program.staging = StageContext(timeout=settings.fetch_timeout, resolve=host.resolve,
                                   stop=lambda: host.halt.halted)
    return program


def _plain_class(cls: type, base: type, set_later: tuple[str, ...] = ()) -> bool:
    """Making a ``cls`` runs only ``base``'s constructor (no metaclass, ``__new__`` or
    ``__init__`` of its own), and the attributes soaf sets afterwards are plain ones."""
    def same(name: str, of: type) -> bool:
        return bool(getattr(cls, name) is getattr(of, name))

    return (type(cls) is type(base) and same("__new__", object) and same("__init__", base)
            and same("__setattr__", object) and same("__getattribute__", object)
            and not any(name in vars(k) for k in cls.__mro__ for name in set_later))


#: plain_steps' answers by program class, then handler class; weak, so the classes of a
#: plugin version that was reloaded away are not kept alive by it.
_PLAIN: weakref.WeakKeyDictionary[type, weakref.WeakKeyDictionary[type, frozenset[str]]] = (
    weakref.WeakKeyDictionary())


def plain_steps(program_cls: type, handler_cls: type) -> frozenset[str]:
    """``_plain_steps``, computed once per pair of classes."""
    by_handler = _PLAIN.get(program_cls)
    if by_handler is None:
        by_handler = _PLAIN.setdefault(program_cls, weakref.WeakKeyDictionary())
    steps = by_handler.get(handler_cls)
    if steps is None:
        steps = by_handler[handler_cls] = _plain_steps(program_cls, handler_cls)
    return steps


def _plain_steps(program_cls: type, handler_cls: type) -> frozenset[str]:
    """The prepare steps of these classes that run soaf's base method, which runs no plugin
    code and waits on nothing but the local disk; ``prepare_input_file`` only when there
    is nothing to stage (``Preparation`` checks), ``build`` only with no ``program`` file
    to copy in. Each of these is called without the guard (it cannot hang)."""
    steps = set()
    if _plain_class(handler_cls, WatcherHandler):
        steps.add("handler")
    if _plain_class(program_cls, ServiceProgramTemplate, ("service", "staging")):
        steps.add("program")
    base = ServiceProgramTemplate
    plain_access = (type(program_cls) is type(base)
                    and program_cls.__getattribute__ is object.__getattribute__)
    for step in ("build", "prepare_input_file", "command", "environment", "working_dir"):
        if plain_access and getattr(program_cls, step) is getattr(base, step):
            steps.add(step)
    program = inspect.getattr_static(program_cls, "program", None)
    if not (program is None or (type(program) is str and not program)):
        steps.discard("build")
    return frozenset(steps)


def _nothing_to_stage(template: ServiceParamTemplate) -> bool:
    """No input, no output, no work path: the work dir check is one ``lstat`` and the
    base ``prepare_input_file`` stages nothing (run without the guard)."""
    cls = type(template)
    return (cls.input_names is ServiceParamTemplate.input_names
            and cls.input_sources is ServiceParamTemplate.input_sources
            and not template.input_files and not template.output_files
            and template.work_path is None)


class Preparation:
    """The plugin calls before the program starts; ``run()`` returns (argv, env, cwd)."""

    def __init__(self, host: AttemptHost, number: int, work_dir: Path, service: Service,
                 call: Callable[..., Any], *, on_handler: Callable[[Any], None]) -> None:
        self.host = host
        self.on_handler = on_handler
        self.number = number
        self.work_dir = work_dir
        self.service = service
        self.call = call
        self.step = ""  # the last plugin call made
        self.handler: Any = None
        self.program: Any = None
        plain = plain_steps(host.plugin.program_cls, host.plugin.handler_cls)
        if _nothing_to_stage(host.template):
            plain |= {"work dir check"}
        else:
            plain -= {"prepare_input_file"}
        #: The steps called directly, not through ``call`` (see ``plain_steps``).
        self.plain = plain

    def run(self) -> tuple[Any, Any, Any]:
        """Raises Halted (a cancel or a core stop came) or PhaseError (plugin code raised)."""
        host, settings, template = self.host, self.host.engines.settings, self.host.template
        try:
            self.handler = self._call("handler", host.plugin.handler_cls)
            self.on_handler(self.handler)
            program = self.program = self._call("program", lambda: make_program(
                host, self.number, self.work_dir, self.service))
            self._call("build", program.build)
            # build() may have made links that lead out
            self._call("work dir check", lambda: workdir.check_names(
                settings.work_root, self.work_dir, template))
            self._halt_check()
            host.emit({"state": State.PREPARING.value, "preparing_at": time.time(),
                       **host.journal_step("built")}, attempt=self.number)
            self._call("prepare_input_file", program.prepare_input_file)
            self._halt_check()
            argv = self._call("command", program.command)
            env = self._call("environment", program.environment)
            cwd = self._call("working_dir", program.working_dir)
        except (Halted, Orphaned):
            raise
        except BaseException as e:  # a plugin may raise SystemExit too
            if host.halt.halted and _stopped(e):
                raise Halted() from None
            raise PhaseError(self.step, e) from e
        self._halt_check()
        return argv, env, cwd

    def _call(self, step: str, fn: Callable[..., Any]) -> Any:
        self.step = step
        if step in self.plain:
            return fn()
        return self.call(step, fn)

    def _halt_check(self) -> None:
        if self.host.halt.halted:
            raise Halted()
