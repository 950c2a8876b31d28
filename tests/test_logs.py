"""The log keeper on real files: the cap holds while a writer appends, the tail is kept,
lines are copied in order, floods are sampled."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from soaf.core.logkeeper import NOTE_STREAM, SHIP_MAX_BYTES, LogKeeper, LogLines

CAP = 64 * 1024


class Sink:
    """Collects what the keeper hands the state writer."""

    def __init__(self) -> None:
        self.items: list[LogLines] = []

    def __call__(self, item: LogLines) -> None:
        self.items.append(item)

    def lines(self, stream: str | None = None) -> list[bytes]:
        return [line for item in self.items for s, _, line in item.entries
                if stream is None or s == stream]


@pytest.fixture(params=["tmpfs", "disk"])
def log_dir(request, tmp_path):
    """A tmpfs dir (hole punching) and one on the main disk (collapse where supported)."""
    if request.param == "tmpfs":
        if not os.access("/dev/shm", os.W_OK):
            pytest.fail("the tests need a writable /dev/shm")
        path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="soaf-logs-"))
        yield path
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    else:
        yield tmp_path


def appender(path: Path) -> int:
    """An O_APPEND descriptor, as a program's stdout is."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def test_cap_holds_while_a_program_appends(log_dir):
    sink = Sink()
    keeper = LogKeeper(sink, max_bytes=CAP, interval=1, lines=1000)
    path = log_dir / "stdout.log"
    fd = appender(path)
    handle = keeper.add("svc", 1, {"stdout": path})
    n = 0
    cut_passes = 0
    for _ in range(60):  # 60 rounds of ~40 KB, a pass of the keeper after each
        chunk = "".join(f"line {n + i:07d} {'y' * 28}\n" for i in range(1000))
        n += 1000
        os.write(fd, chunk.encode())
        cut_passes += keeper.tick()  # the number of files cut in this pass
        st = os.stat(path)
        assert st.st_blocks * 512 <= CAP + 64 * 1024  # cap + one round, whatever the size says
    os.write(fd, b"last line\n")
    os.close(fd)
    stats = keeper.finish(handle)
    data = path.read_bytes()
    assert len(data) <= CAP
    lines = data.decode().splitlines()
    assert lines[-1] == "last line" and lines[-2].startswith(f"line {n - 1:07d}")
    assert all(line.startswith("line ") for line in lines[:-1])  # whole lines only
    assert stats["stdout_bytes"] == len(data)
    assert stats["stdout_dropped_bytes"] + len(data) == 60 * 1000 * 42 + len("last line\n")
    assert keeper.trims == cut_passes > 5
    # every line the keeper copied is a whole line, in order
    shipped = [line for line in sink.lines("stdout")]
    numbers = [int(line.split()[1]) for line in shipped if line.startswith(b"line ")]
    assert numbers == sorted(numbers) and shipped[-1] == b"last line"


def test_lines_are_copied_once_and_partial_lines_wait(tmp_path):
    sink = Sink()
    keeper = LogKeeper(sink, max_bytes=CAP, interval=1, lines=1000)
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    out.write_bytes(b"from an earlier attempt\n")
    fd_out, fd_err = appender(out), appender(err)
    handle = keeper.add("svc", 2, {"stdout": out, "stderr": err})
    os.write(fd_out, b"one\ntw")
    os.write(fd_err, b"warning\n")
    keeper.tick()
    assert sink.lines("stdout") == [b"one"] and sink.lines("stderr") == [b"warning"]
    keeper.tick()
    assert len(sink.items) == 1  # nothing new: nothing sent
    os.write(fd_out, b"o\nthree")
    keeper.tick()
    assert sink.lines("stdout") == [b"one", b"two"]
    keeper.finish(handle)  # the program ended: its unfinished last line counts
    assert sink.lines("stdout") == [b"one", b"two", b"three"]
    assert {a for item in sink.items for _, a, _ in item.entries} == {2}
    assert all(item.maxlen == 1000 for item in sink.items)
    os.close(fd_out)
    os.close(fd_err)


def test_a_flood_is_sampled_with_a_note(tmp_path):
    sink = Sink()
    keeper = LogKeeper(sink, max_bytes=10 * 1024 * 1024, interval=1, lines=1000)
    path = tmp_path / "stdout.log"
    fd = appender(path)
    handle = keeper.add("svc", 1, {"stdout": path})
    os.write(fd, b"".join(b"flood %08d\n" % i for i in range(200_000)))
    keeper.tick()
    notes = sink.lines(NOTE_STREAM)
    assert len(notes) == 2 and b"not copied here" in notes[0]
    stdout = sink.lines("stdout")
    assert len(stdout) <= 200 and stdout[-1] == b"flood 00199999"
    assert sum(len(line) + 1 for line in stdout) <= SHIP_MAX_BYTES
    keeper.finish(handle)
    os.close(fd)


def test_disconnected_keeps_nothing_in_memory(tmp_path):
    sink = Sink()
    connected = [False]
    keeper = LogKeeper(sink, max_bytes=CAP, interval=1, lines=10, connected=lambda: connected[0])
    path = tmp_path / "stdout.log"
    fd = appender(path)
    handle = keeper.add("svc", 1, {"stdout": path})
    os.write(fd, b"a\nb\n")
    keeper.tick()
    assert sink.items == []
    connected[0] = True
    os.write(fd, b"c\n")
    keeper.tick()
    assert sink.lines() == [b"a", b"b", b"c"]
    keeper.finish(handle)
    os.close(fd)


def test_carriage_returns_end_lines_and_a_redrawn_line_ships_once_per_pass(tmp_path):
    sink = Sink()
    keeper = LogKeeper(sink, max_bytes=CAP, interval=1, lines=1000)
    path = tmp_path / "stdout.log"
    fd = appender(path)
    handle = keeper.add("svc", 1, {"stdout": path})
    os.write(fd, b"start\n" + b"".join(b"\rprogress %d%%" % i for i in range(50)))
    keeper.tick()
    assert sink.lines() == [b"start", b"progress 48%"]  # 49% may still be redrawn
    os.write(fd, b"\rprogress 73%\rdone\nnext\r\n")
    keeper.tick()
    assert sink.lines()[2:] == [b"done", b"next"]
    os.write(fd, b"tail\rend")
    keeper.finish(handle)
    assert sink.lines()[4:] == [b"tail", b"end"]
    os.close(fd)
