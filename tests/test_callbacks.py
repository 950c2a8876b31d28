"""The callback loop in this process: which file_change_callback calls are made, and when."""

import os
import threading
import time

from soaf import ServiceParamTemplate, WatcherHandler
from soaf.plugin.handler import DefaultHandler
from soaf.plugin.service import Service
from soaf.run import callbacks
from soaf.run.callbacks import DirSignature, callback_loop


class Program:
    """What the loop needs of a running program: an ``exited`` event."""

    def __init__(self) -> None:
        self.exited = threading.Event()


def run_loop(tmp_path, handler, *, watch_interval=0.1, file_poll=0.05):
    """Start the loop in a thread; returns (service, program, wake, calls, thread)."""
    template = ServiceParamTemplate("x", watch_interval=watch_interval)
    service = Service(template, tmp_path, attempt=1, node="n", plugin_version="1",
                      emit=lambda values: None)
    program, wake, made = Program(), threading.Event(), []

    def call(name, fn, *args):
        made.append(name)
        return fn(*args)

    thread = threading.Thread(target=callback_loop, args=(handler, service, program, call),
                              kwargs={"wake": wake, "file_poll": file_poll}, daemon=True)
    thread.start()
    return service, program, wake, made, thread


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def end(program, wake, thread):
    program.exited.set()
    wake.set()
    thread.join(5)
    assert not thread.is_alive()


def test_a_handler_without_its_own_file_change_callback_gets_no_calls(tmp_path):
    class Quiet(WatcherHandler):
        service = "x"

    _service, program, wake, made, thread = run_loop(tmp_path, Quiet())
    time.sleep(0.5)
    (tmp_path / "new.txt").write_text("x")
    time.sleep(0.3)
    end(program, wake, thread)
    assert made == []  # its callbacks are the base class's, which do nothing


def test_the_default_handler_is_called_only_when_its_files_may_have_changed(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(callbacks, "MAX_FILE_POLL", 0.1)  # the shared watcher's period
    service, program, wake, made, thread = run_loop(tmp_path, DefaultHandler(),
                                                    watch_interval=1)
    time.sleep(1.0)  # ten intervals of a quiet work dir: one call, the first
    assert made == ["file_change_callback"]
    assert service.fields["file_count"] == 0
    os.mkdir(tmp_path / "out")  # an empty directory is watched too
    time.sleep(1.2)
    (tmp_path / "out" / "a.txt").write_text("a")
    wait_for(lambda: service.fields["file_count"] == 1)
    calls = made.count("file_change_callback")
    end(program, wake, thread)
    assert made.count("file_change_callback") == calls + 1  # once more after the end
    assert calls <= 6, made


def test_a_program_that_ends_within_the_grace_gets_one_default_look(tmp_path, monkeypatch):
    """The default handler's first look waits ``FIRST_LOOK_GRACE`` for the program's end:
    a program that ends within it is listed once, after its end, with its final files."""
    monkeypatch.setattr(callbacks, "FIRST_LOOK_GRACE", 5.0)
    service, program, wake, made, thread = run_loop(tmp_path, DefaultHandler(),
                                                    watch_interval=1)
    time.sleep(0.2)
    assert made == []  # no look yet
    (tmp_path / "out.txt").write_text("x")
    end(program, wake, thread)
    assert made == ["file_change_callback"]
    assert service.fields["file_count"] == 1


def test_the_default_handler_is_called_at_least_every_count_refresh(tmp_path, monkeypatch):
    monkeypatch.setattr(callbacks, "COUNT_REFRESH", 0.3)
    monkeypatch.setattr(callbacks, "MAX_FILE_POLL", 0.1)
    _service, program, wake, made, thread = run_loop(tmp_path, DefaultHandler(),
                                                     watch_interval=1)
    wait_for(lambda: made.count("file_change_callback") >= 3)
    end(program, wake, thread)


def test_the_default_handlers_loop_ends_when_its_program_exits(tmp_path, monkeypatch):
    """Its thread sleeps until woken; the shared watcher wakes it once the program has
    exited, even if the exit's own wake-up came before ``exited`` was set."""
    monkeypatch.setattr(callbacks, "MAX_FILE_POLL", 0.1)
    _service, program, _wake, made, thread = run_loop(tmp_path, DefaultHandler(),
                                                      watch_interval=1)
    wait_for(lambda: "file_change_callback" in made)
    program.exited.set()  # and no wake
    thread.join(5)
    assert not thread.is_alive()
    assert made.count("file_change_callback") == 2  # the first, and the one after the end


def test_many_default_handler_services_share_one_watcher_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(callbacks, "MAX_FILE_POLL", 0.1)
    loops = []
    for i in range(20):
        (tmp_path / str(i)).mkdir()
        loops.append(run_loop(tmp_path / str(i), DefaultHandler(), watch_interval=1))
    wait_for(lambda: all("file_change_callback" in made for _s, _p, _w, made, _t in loops))
    names = [t.name for t in threading.enumerate()]
    assert names.count("soaf-quiet-dirs") == 1
    for _service, program, wake, _made, thread in loops:
        end(program, wake, thread)


def test_a_changed_dir_too_recent_to_tell_is_not_settled(tmp_path):
    signature = DirSignature(str(tmp_path))
    (tmp_path / "f").write_text("x")
    assert signature.changed()
    assert not signature.settled  # its modification time is younger than SETTLE_NS
    time.sleep(callbacks.SETTLE_NS / 1e9 + 0.05)
    assert not signature.changed()
    assert signature.settled


def test_a_handler_of_its_own_is_still_called_every_interval(tmp_path):
    class Counting(WatcherHandler):
        service = "x"

        def file_change_callback(self, service, files):
            return None

    _service, program, wake, made, thread = run_loop(tmp_path, Counting(), watch_interval=0.1)
    wait_for(lambda: made.count("file_change_callback") >= 6)  # with no change at all
    end(program, wake, thread)


def test_the_last_look_is_handed_on_only_when_soafs_own_callback_made_it(tmp_path):
    (tmp_path / "out.txt").write_text("x")
    template = ServiceParamTemplate("x", watch_interval=1)

    class Own(DefaultHandler):
        def file_change_callback(self, service, files):  # may write into the work dir
            (tmp_path / "more.txt").write_text("y")

    got = {}
    for handler in (DefaultHandler(), Own()):
        service = Service(template, tmp_path, attempt=1, node="n", plugin_version="1",
                          emit=lambda values: None)
        program = Program()
        program.exited.set()  # a program that ended at once: only the look after the end
        got[type(handler)] = callback_loop(handler, service, program,
                                           lambda name, fn, *args: fn(*args),
                                           wake=threading.Event(), file_poll=0.05)
    assert got == {DefaultHandler: ["out.txt"], Own: None}  # the caller lists them again


def test_the_default_after_watch_call_is_skipped_only_when_it_cannot_change_anything():
    from soaf.run.callbacks import counted

    class OwnAfter(DefaultHandler):
        def after_watch_callback(self, service, files):
            pass

    class OwnLooks(DefaultHandler):
        def file_change_callback(self, service, files):
            pass

    assert counted(DefaultHandler(), ["stdout.log"])  # the look after the end counted them
    assert counted(DefaultHandler(), [])
    assert not counted(DefaultHandler(), None)  # no look after the end (stopped)
    assert not counted(OwnAfter(), ["a"]) and not counted(OwnLooks(), ["a"])
    assert not counted(WatcherHandler(), ["a"])
