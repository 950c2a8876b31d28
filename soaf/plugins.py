"""Load the ``handlers`` and ``services`` packages into an immutable Registry generation.

Every load re-imports both packages from scratch (all submodules, helper modules
included) so no stale class survives. A load that fails in any way leaves the
previous generation in place and in ``sys.modules``. Running services hold their
generation's classes, so they keep the code they started with until they end.
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
from dataclasses import dataclass, field
from pathlib import Path

from soaf.errors import PluginError, UnknownServiceError
from soaf.handler import DefaultHandler, WatcherHandler
from soaf.program import ServiceProgramTemplate

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
        return self.handlers.get(name, DefaultHandler)


def plugin_files(root: Path) -> list[Path]:
    """Every Python file of the plugin packages, in a stable order."""
    files: list[Path] = []
    for package in PACKAGES:
        base = root / package
        if base.is_dir():
            files.extend(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)
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


def describe_error(exc: BaseException, root: Path) -> str:
    """A one-paragraph account of a load error that names the file and line."""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f"{exc.filename}:{exc.lineno}"
        return f"{type(exc).__name__} in {where}: {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)
    root_s = str(root.resolve())
    inside = [f for f in frames if f.filename.startswith(root_s)]
    frame = inside[-1] if inside else (frames[-1] if frames else None)
    where = f" at {frame.filename}:{frame.lineno}" if frame else ""
    return f"{type(exc).__name__}{where}: {exc}"


def _module_names() -> list[str]:
    return [
        name
        for name in list(sys.modules)
        if name in PACKAGES or name.startswith(tuple(p + "." for p in PACKAGES))
    ]


def _import_all(root: Path) -> list[object]:
    modules: list[object] = []
    for package in PACKAGES:
        base = root / package
        if not base.is_dir():
            continue
        if not (base / "__init__.py").exists():
            raise PluginError(f"{base} is not a package: add an empty __init__.py")
        modules.append(importlib.import_module(package))
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts or (path.name == "__init__.py" and path.parent == base):
                continue
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules.append(importlib.import_module(".".join(parts)))
    return modules


def _collect(modules: list[object], number: int, digest: str) -> Registry:
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
                    other = programs[obj.name]
                    raise PluginError(
                        f"service name {obj.name!r} claimed twice: "
                        f"{other.__module__}.{other.__qualname__} and {module_name}.{obj.__qualname__}"
                    )
                obj._soaf_module_file = getattr(module, "__file__", None)  # type: ignore[attr-defined]
                programs[obj.name] = obj
            elif issubclass(obj, WatcherHandler) and obj.service:
                if obj.service in handlers:
                    other_h = handlers[obj.service]
                    raise PluginError(
                        f"two handlers watch service {obj.service!r}: "
                        f"{other_h.__module__}.{other_h.__qualname__} and "
                        f"{module_name}.{obj.__qualname__}"
                    )
                handlers[obj.service] = obj
    return Registry(number=number, digest=digest, programs=programs, handlers=handlers)


class PluginLoader:
    """Loads generations; keeps the last good one when a load fails."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.current: Registry | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._number = 0
        self._lock = threading.Lock()

    def load(self) -> Registry:
        """Import a new generation and make it current; PluginError (old one kept) on failure."""
        with self._lock:
            digest = content_digest(self.root)
            saved = {name: sys.modules.pop(name) for name in _module_names()}
            root_s = str(self.root)
            if root_s not in sys.path:
                sys.path.insert(0, root_s)
            importlib.invalidate_caches()
            try:
                modules = _import_all(self.root)
                registry = _collect(modules, self._number + 1, digest)
            except BaseException as e:  # a plugin may raise anything at import time
                for name in _module_names():
                    sys.modules.pop(name, None)
                sys.modules.update(saved)
                self.last_error = describe_error(e, self.root)
                self.last_error_at = time.time()
                log.error("plugin load failed, keeping version %s: %s",
                          self.current.version if self.current else "none", self.last_error,
                          exc_info=not isinstance(e, (SyntaxError, PluginError)))
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise PluginError(self.last_error) from e
            self._number = registry.number
            self.current = registry
            self.last_error = None
            self.last_error_at = None
            log.info("plugins version %s loaded: services %s", registry.version,
                     ", ".join(sorted(registry.programs)) or "none")
            return registry
