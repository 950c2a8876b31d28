"""Load the ``handlers`` and ``services`` packages into an immutable Registry generation.

Every load re-imports both packages from scratch (all submodules, helper modules
included, always from source: see ``soaf.plugin.importer``) so no stale class survives. A
load that fails in any way, or does not finish within its time limit, leaves the
previous generation in place and in ``sys.modules``. Running services hold their
generation's classes, so they keep the code they started with until they end.

Nothing on a service's path takes the loader's lock: the intake reads ``current``
(one attribute read) and a service keeps the Registry it was claimed with.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from soaf.errors import PluginError, UnknownServiceError
from soaf.plugin.handler import DefaultHandler, WatcherHandler
from soaf.plugin.importer import Attempt, install_finder
from soaf.plugin.probes import check_progress, probed
from soaf.plugin.program import ServiceProgramTemplate

log = logging.getLogger(__name__)

PACKAGES = ("services", "handlers")


@dataclass(frozen=True)
class Registry:
    """One loaded generation of plugins."""

    number: int
    digest: str
    programs: dict[str, type[ServiceProgramTemplate]] = field(default_factory=dict)
    handlers: dict[str, type[WatcherHandler]] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)
    #: The generation's modules as they were in ``sys.modules``, to put back after a
    #: failed load.
    modules: dict[str, ModuleType] = field(default_factory=dict, repr=False)

    @property
    def version(self) -> str:
        """``<number>-<first 8 hex of the content hash>``, recorded on every service."""
        return f"{self.number}-{self.digest[:8]}"

    def program(self, name: str) -> type[ServiceProgramTemplate]:
        try:
            return self.programs[name]
        except KeyError:
            known = ", ".join(sorted(self.programs)) or "none"
            raise UnknownServiceError(f"unknown service {name!r}; known: {known}") from None

    def handler(self, name: str) -> type[WatcherHandler]:
        """The service's handler (or the default one), measuring its program's progress
        probe first when it declares one."""
        handler = self.handlers.get(name, DefaultHandler)
        probe = getattr(self.programs.get(name), "progress", None)
        return probed(handler, probe) if probe is not None else handler


@dataclass(frozen=True)
class LoadError:
    """Why the last load failed: a readable account plus the plugin file and line."""

    text: str
    file: str | None = None
    line: int | None = None
    at: float = field(default_factory=time.time)


def is_source(rel: Path) -> bool:
    """Whether a path relative to the plugin root is (part of) a plugin package's source.

    Hidden names (editor locks and swap files such as ``.#x.py``, ``.x.py.swp``) and
    ``__pycache__`` are not; of the files, only ``.py`` ones are.
    """
    parts = rel.parts
    if not parts or parts[0] not in PACKAGES:
        return False
    return not any(p == "__pycache__" or p.startswith(".") for p in parts)


def plugin_files(root: Path) -> list[Path]:
    """Every Python file of the plugin packages, in a stable order."""
    files: list[Path] = []
    for package in PACKAGES:
        base = root / package
        if base.is_dir():
            files.extend(p for p in base.rglob("*.py") if is_source(p.relative_to(root)))
    return sorted(files)


def content_digest(root: Path) -> str:
    """sha256 over the plugin files' relative paths and contents."""
    digest = hashlib.sha256()
    for path in plugin_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            continue
        digest.update(b"\0")
    return digest.hexdigest()


def describe_error(exc: BaseException, root: Path) -> LoadError:
    """An account of a load error that names the plugin file and line it came from."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return LoadError(f"{type(exc).__name__} in {exc.filename}:{exc.lineno}: {exc.msg}",
                         exc.filename, exc.lineno)
    if isinstance(exc, _Located):
        return LoadError(str(exc), exc.file, exc.line)
    frames = traceback.extract_tb(exc.__traceback__)
    root_s = str(root.resolve())
    inside = [f for f in frames if f.filename.startswith(root_s)]
    frame = inside[-1] if inside else (frames[-1] if frames else None)
    where = f" at {frame.filename}:{frame.lineno}" if frame else ""
    text = f"{type(exc).__name__}{where}: {exc}"
    if isinstance(exc, SystemExit):
        text = f"SystemExit{where}: a plugin called sys.exit({exc.code!r}) at import"
    return LoadError(text, frame.filename if frame else None, frame.lineno if frame else None)


class _Located(PluginError):
    """A PluginError that knows the plugin file and line it is about."""

    def __init__(self, text: str, file: str | None, line: int | None) -> None:
        super().__init__(text)
        self.file = file
        self.line = line


def _module_names() -> list[str]:
    return [
        name
        for name in list(sys.modules)
        if name in PACKAGES or name.startswith(tuple(p + "." for p in PACKAGES))
    ]


def _install(modules: dict[str, ModuleType]) -> None:
    """Make ``modules`` the plugin modules in ``sys.modules``, and only them."""
    for name in _module_names():
        sys.modules.pop(name, None)
    sys.modules.update(modules)


def _import_all(root: Path) -> list[ModuleType]:
    modules: list[ModuleType] = []
    for package in PACKAGES:
        base = root / package
        if not base.is_dir():
            continue
        if not (base / "__init__.py").exists():
            raise PluginError(f"{base} is not a package: add an empty __init__.py")
        modules.append(importlib.import_module(package))
        for path in plugin_files(root):
            if path.parts[len(root.parts)] != package or path == base / "__init__.py":
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules.append(importlib.import_module(".".join(parts)))
    return modules


def _where(cls: type) -> tuple[str | None, int | None]:
    try:
        return inspect.getsourcefile(cls), inspect.getsourcelines(cls)[1]
    except (OSError, TypeError):
        return None, None


def _claimed_twice(kind: str, key: str, first: type, second: type) -> _Located:
    file1, line1 = _where(first)
    file2, line2 = _where(second)
    return _Located(
        f"{kind} {key!r} claimed twice: {first.__module__}.{first.__qualname__} "
        f"({file1}:{line1}) and {second.__module__}.{second.__qualname__} ({file2}:{line2})",
        file2, line2,
    )


Collected = tuple[
    list[ModuleType], dict[str, type[ServiceProgramTemplate]], dict[str, type[WatcherHandler]]
]


def _collect(modules: list[ModuleType]) -> Collected:
    programs: dict[str, type[ServiceProgramTemplate]] = {}
    handlers: dict[str, type[WatcherHandler]] = {}
    for module in modules:
        module_name = getattr(module, "__name__", "")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ != module_name:
                continue  # imported from elsewhere; counted where it is defined
            if issubclass(obj, ServiceProgramTemplate) and obj is not ServiceProgramTemplate:
                if not obj.name:
                    continue  # an abstract base for other programs
                if obj.name in programs:
                    raise _claimed_twice("service name", obj.name, programs[obj.name], obj)
                check_progress(obj)
                obj._soaf_module_file = getattr(module, "__file__", None)  # type: ignore[attr-defined]
                programs[obj.name] = obj
            elif issubclass(obj, WatcherHandler) and obj.service:
                if obj.service in handlers:
                    raise _claimed_twice("handler of service", obj.service,
                                         handlers[obj.service], obj)
                handlers[obj.service] = obj
    return modules, programs, handlers


class PluginLoader:
    """Loads generations; keeps the last good one when a load fails or hangs.

    ``numbers`` gives the number of the next generation from the last one; by default
    it counts up from 1 in this process (the core passes one that keeps counting in
    Redis across restarts).
    """

    def __init__(self, root: Path, *, numbers: Callable[[int], int] | None = None) -> None:
        self.root = root.resolve()
        self.current: Registry | None = None
        self.error: LoadError | None = None
        #: Content digest and time of the last load attempt, successful or not.
        self.attempted_digest: str | None = None
        self.attempted_at: float | None = None
        #: Loads that failed since the start (the metrics' reload failures).
        self.failures = 0
        self._numbers = numbers or (lambda last: last + 1)
        self._number = 0
        self._lock = threading.Lock()

    def load(self, *, timeout: float | None = None) -> Registry:
        """Import a new generation and make it current; PluginError (old one kept) on failure.

        The import runs in a thread of its own; if it has not finished after ``timeout``
        seconds it is abandoned (see ``soaf.plugin.importer``) and the load fails.
        """
        with self._lock:
            digest = content_digest(self.root)
            self.attempted_digest = digest
            self.attempted_at = time.time()
            install_finder(PACKAGES)
            previous = self.current.modules if self.current else {}
            _install({})
            root_s = str(self.root)
            if root_s not in sys.path:
                sys.path.insert(0, root_s)
            importlib.invalidate_caches()
            attempt = Attempt(lambda: _collect(_import_all(self.root)),
                              name="soaf-plugin-import", on_late_end=self._repair)
            if not attempt.run(timeout):
                file, line = attempt.where(self.root) or (None, None)
                attempt.abandon()
                _install(previous)
                where = f" (it is at {file}:{line})" if file else ""
                raise self._failed(LoadError(
                    f"importing the plugins did not finish within {timeout:g} s{where}; "
                    "the import was abandoned (its thread stays until the core restarts)",
                    file, line))
            if attempt.error is not None:
                _install(previous)
                error = describe_error(attempt.error, self.root)
                raise self._failed(error, attempt.error)
            imported, programs, handlers = attempt.result
            modules = {m.__name__: m for m in imported}
            modules.update((name, sys.modules[name]) for name in _module_names())
            try:
                number = self._numbers(self._number)
            except Exception:
                log.exception("cannot number the new plugin version; counting on locally")
                number = self._number + 1
            registry = Registry(number=number, digest=digest, programs=programs,
                                handlers=handlers, modules=modules)
            self._number = registry.number
            self.current = registry
            self.error = None
            log.info("plugins version %s loaded: services %s", registry.version,
                     ", ".join(sorted(registry.programs)) or "none")
            return registry

    def _repair(self) -> None:
        """Put the current generation's modules back (after an abandoned import ended)."""
        with self._lock:
            _install(self.current.modules if self.current else {})

    def _failed(self, error: LoadError, cause: BaseException | None = None) -> PluginError:
        self.error = error
        self.failures += 1
        log.error("plugin load failed, keeping version %s: %s",
                  self.current.version if self.current else "none", error.text,
                  exc_info=(type(cause), cause, cause.__traceback__)
                  if cause is not None and not isinstance(cause, (SyntaxError, PluginError))
                  else None)
        exc = PluginError(error.text)
        exc.__cause__ = cause
        return exc
