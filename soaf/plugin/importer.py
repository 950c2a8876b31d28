"""Import the plugin packages from source, in a thread of their own, within a time limit.

Two things the standard import system does not give a reloading core:

* **Always the source on disk.** Python reuses a ``__pycache__`` file whose recorded
  source mtime (whole seconds) and size match, so two same-sized saves within one
  second would bring back the old code. Plugin modules are therefore always compiled
  from source and never cached as bytecode (``PluginFinder``).
* **A load that cannot hang the core.** A plugin file may block at import (a network
  call, ``input()``, a lock). ``Attempt`` runs the import in a daemon thread and waits
  a limited time. A thread cannot be killed in Python, so a hung import is
  *abandoned*: its module locks are detached so the next load can import the same
  names again, any plugin module it tries to execute afterwards fails at once, and
  if it ever ends, its owner is told so it can put ``sys.modules`` right again. Its thread (and
  whatever CPU a busy loop burns) stays until the core restarts. Nothing in-process
  protects against ``os._exit()``, a crash in a C extension, or code that holds the
  GIL forever; those need a restart.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder, SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any

from soaf.errors import PluginError

log = logging.getLogger(__name__)

_local = threading.local()


class SourceOnlyLoader(SourceFileLoader):
    """Compiles a plugin module from its source every time; reads and writes no bytecode."""

    def path_stats(self, path: str) -> Mapping[str, Any]:
        # SourceLoader.get_code reads (and writes) __pycache__ only when this succeeds.
        raise OSError("plugin modules are always compiled from source")

    def exec_module(self, module: ModuleType) -> None:
        attempt: Attempt | None = getattr(_local, "attempt", None)
        if attempt is not None and attempt.abandoned:
            raise PluginError(f"plugin load abandoned; not importing {module.__name__}")
        super().exec_module(module)


class PluginFinder(MetaPathFinder):
    """Finds the plugin packages as usual, then swaps in ``SourceOnlyLoader``."""

    def __init__(self, packages: Sequence[str]) -> None:
        self.packages = tuple(packages)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname.partition(".")[0] not in self.packages:
            return None
        spec = PathFinder.find_spec(fullname, path)
        if spec is not None and type(spec.loader) is SourceFileLoader and spec.origin:
            spec.loader = SourceOnlyLoader(fullname, spec.origin)
        return spec


def install_finder(packages: Sequence[str]) -> None:
    """Put a ``PluginFinder`` for ``packages`` first on ``sys.meta_path`` (once)."""
    for finder in sys.meta_path:
        if isinstance(finder, PluginFinder) and finder.packages == tuple(packages):
            return
    sys.meta_path.insert(0, PluginFinder(packages))


def release_module_locks(ident: int) -> list[str]:
    """Detach the import locks a (hung) thread holds, so other threads can import those names.

    This reaches into ``importlib._bootstrap``: a module lock is only ever looked up in
    ``_module_locks``, so dropping the entry makes the next import of that name use a
    fresh lock while the hung thread keeps its old one. Returns the names released.
    """
    try:
        import _imp
        from importlib import _bootstrap

        locks: dict[str, Any] = _bootstrap._module_locks  # type: ignore[attr-defined]
    except (ImportError, AttributeError):  # pragma: no cover - another Python implementation
        log.warning("cannot release the import locks of a hung plugin import on this Python")
        return []
    released: list[str] = []
    _imp.acquire_lock()
    try:
        for name, ref in list(locks.items()):
            lock = ref()
            if lock is not None and getattr(lock, "owner", None) == ident:
                del locks[name]
                released.append(name)
    finally:
        _imp.release_lock()
    return released


class Attempt:
    """One import of the plugin packages, run in a daemon thread of its own."""

    def __init__(
        self, target: Callable[[], Any], *, name: str,
        on_late_end: Callable[[], None] | None = None,
    ) -> None:
        self._target = target
        self._on_late_end = on_late_end
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        _local.attempt = self
        try:
            self.result = self._target()
        except BaseException as e:  # SystemExit and all: a plugin may raise anything
            self.error = e
        finally:
            self.done.set()
        if self.abandoned and self._on_late_end is not None:
            # A failing import deletes its module's name from sys.modules, and that name
            # may belong to a newer generation by now: let the owner repair it.
            log.warning("an abandoned plugin import ended after all; its result is discarded")
            self._on_late_end()

    def run(self, timeout: float | None) -> bool:
        """Start and wait; True if the import finished (well or not) within ``timeout``."""
        self.thread.start()
        return self.done.wait(timeout)

    def where(self, root: Path) -> tuple[str, int] | None:
        """File and line inside ``root`` where the (still running) import is now."""
        frame = sys._current_frames().get(self.thread.ident or -1)
        if frame is None:
            return None
        root_s = str(root)
        inside = [f for f in traceback.extract_stack(frame) if f.filename.startswith(root_s)]
        if not inside:
            return None
        return inside[-1].filename, inside[-1].lineno or 0

    def abandon(self) -> list[str]:
        """Give up on a hung import: it may never commit anything; free its import locks."""
        self.abandoned = True
        released = release_module_locks(self.thread.ident or -1)
        log.warning("abandoned the hung plugin import thread %s (released import locks: %s)",
                    self.thread.name, ", ".join(released) or "none")
        return released
