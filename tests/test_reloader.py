"""Reloader in this process: real files, a real watchdog observer, a real PluginLoader."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from soaf.plugin.loader import PluginLoader
from soaf.plugin.reloader import Reloader
from tests.conftest import wait_until
from tests.test_plugins import PROGRAM, root, write

__all__ = ["root"]  # the fixture, shared with test_plugins


class Results:
    def __init__(self) -> None:
        self.outcomes: list[bool] = []
        self.lock = threading.Lock()

    def __call__(self, ok: bool) -> None:
        with self.lock:
            self.outcomes.append(ok)

    def __len__(self) -> int:
        with self.lock:
            return len(self.outcomes)


@pytest.fixture
def make(root: Path) -> Iterator[Callable[..., tuple[PluginLoader, Reloader, Results]]]:
    started: list[Reloader] = []

    def make(**options) -> tuple[PluginLoader, Reloader, Results]:
        loader = PluginLoader(root)
        loader.load()
        results = Results()
        settings = {"debounce": 0.2, "poll": 0.0, "watch": True, "timeout": 10.0, **options}
        reloader = Reloader(loader, on_result=results, **settings)
        reloader.start()
        started.append(reloader)
        return loader, reloader, results

    yield make
    for reloader in started:
        reloader.stop()


def value(loader: PluginLoader, name: str = "a"):
    registry = loader.current
    return registry.programs[name].value if registry and name in registry.programs else None


def test_a_saved_file_is_loaded(root, make):
    write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    loader, _, results = make()
    write(root, "services/a.py", PROGRAM.format(name="a", value=2))
    wait_until(lambda: value(loader) == 2, 15, message="the new version")
    assert loader.current.number == 2 and results.outcomes == [True]


def test_a_burst_of_saves_is_one_reload(root, make):
    write(root, "services/a.py", PROGRAM.format(name="a", value=0))
    loader, _, results = make(debounce=1.0)
    for i in range(1, 11):
        write(root, "services/a.py", PROGRAM.format(name="a", value=i))
        threading.Event().wait(0.02)
    wait_until(lambda: results.outcomes, 15, message="a reload")
    with pytest.raises(AssertionError):
        wait_until(lambda: len(results) > 1, 2.5, message="a second reload")
    assert value(loader) == 10 and loader.current.number == 2


def test_poll_alone_catches_a_change(root, make):
    write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    loader, reloader, _ = make(watch=False, poll=0.2)
    assert reloader._observer is None
    write(root, "services/b.py", PROGRAM.format(name="b", value=1))
    wait_until(lambda: loader.current.number == 2, 15, message="the poll to reload")
    assert sorted(loader.current.programs) == ["a", "b"]


def test_unchanged_content_is_not_a_new_version(root, make):
    path = write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    loader, reloader, results = make(poll=0.1)
    path.write_text(path.read_text())  # saved again, same bytes: events, same digest
    path.touch()
    wait_until(lambda: reloader._changes > 0, 15, message="the file events")
    with pytest.raises(AssertionError):
        wait_until(lambda: len(results) > 0, 1.5, message="a reload")
    assert loader.current.number == 1


def test_a_broken_version_is_not_retried_until_it_changes(root, make):
    write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    loader, _, results = make(poll=0.1)
    write(root, "services/b.py", "def broken(:\n")
    wait_until(lambda: results.outcomes == [False], 15, message="the failed load")
    with pytest.raises(AssertionError):
        wait_until(lambda: len(results) > 1, 1.5, message="a retry")
    write(root, "services/b.py", PROGRAM.format(name="b", value=2))
    wait_until(lambda: results.outcomes == [False, True], 15, message="the fixed load")
    assert loader.error is None and value(loader, "b") == 2


def test_editor_temp_files_and_pycache_do_not_count(root, make):
    _, reloader, _ = make()
    counted: list[Path] = []
    concerns = reloader.concerns

    def spy(path: Path, *, is_dir: bool) -> bool:
        verdict = concerns(path, is_dir=is_dir)
        if verdict:
            counted.append(path)
        return verdict

    reloader.concerns = spy  # type: ignore[method-assign]
    services = root / "services"
    (services / "__pycache__").mkdir()
    (services / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (services / ".a.py.swp").write_text("swap")
    (services / ".#a.py").write_text("lock")
    (services / "a.py~").write_text("backup")
    (services / "notes.txt").write_text("notes")
    # Events arrive in order: once a real source file's event is in, the others were seen.
    write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    wait_until(lambda: counted, 15, message="the event of a.py")
    assert set(counted) == {services / "a.py"}


def test_a_package_created_later_is_watched(root, make):
    shutil.rmtree(root / "handlers")
    loader, _, _ = make()
    write(root, "handlers/__init__.py", "")
    write(root, "handlers/h.py", """\
        from soaf import WatcherHandler

        class H(WatcherHandler):
            service = "a"
        """)
    wait_until(lambda: loader.current.number >= 2 and "a" in loader.current.handlers, 15,
               message="the new package's handler")


def test_request_reloads_even_without_changes(root, make):
    write(root, "services/a.py", PROGRAM.format(name="a", value=1))
    loader, reloader, results = make()
    digest = loader.current.digest
    reloader.request()
    wait_until(lambda: loader.current.number == 2, 15, message="the requested reload")
    assert loader.current.digest == digest and results.outcomes == [True]


def test_a_package_replaced_as_a_whole_is_still_watched(root, make):
    """``rm -r handlers`` and a fresh copy (a checkout, a deploy): events keep coming."""
    loader, _, results = make()
    shutil.rmtree(root / "handlers")
    wait_until(lambda: results.outcomes, 15, message="the reload after the removal")
    write(root, "handlers/__init__.py", "")
    write(root, "handlers/h.py", """\
        from soaf import WatcherHandler

        class H(WatcherHandler):
            service = "a"
        """)
    wait_until(lambda: "a" in loader.current.handlers, 15, message="the new handler")
    write(root, "handlers/h.py", """\
        from soaf import WatcherHandler

        class H(WatcherHandler):
            service = "b"
        """)
    wait_until(lambda: "b" in loader.current.handlers, 15, message="the edited handler")
