"""OutputFile: the last lines of a program's output, then what it appends."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from soaf.client.tail import OutputFile


def test_tail_then_new_lines(tmp_path):
    path = tmp_path / "stdout.log"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(1, 20001)) + b"part")
    out = OutputFile(path)
    assert out.tail(3) == ["line 19998", "line 19999", "line 20000"]  # more than one chunk back
    assert out.new_lines() == []  # the partial last line waits for its end
    with open(path, "ab") as f:
        f.write(b"ial\nnext\nhalf")
    assert out.new_lines() == ["partial", "next"]
    assert out.new_lines(final=True) == ["half"]


def test_whole_file_missing_file_and_zero_lines(tmp_path):
    path = tmp_path / "stdout.log"
    out = OutputFile(path)
    assert out.tail(None) == [] and out.tail(5) == []
    path.write_text("a\nb\n")
    assert OutputFile(path).tail(None) == ["a", "b"]
    assert OutputFile(path).tail(0) == []
    assert out.new_lines() == ["a", "b"]


def test_a_file_that_shrinks_or_is_replaced_is_read_from_its_start(tmp_path):
    path = tmp_path / "stdout.log"
    path.write_text("one\ntwo\nthree\n")
    out = OutputFile(path)
    assert out.tail(None) == ["one", "two", "three"]
    path.write_text("kept tail\n")  # truncated in place: smaller than what was read
    assert out.new_lines() == ["kept tail"]
    replacement = tmp_path / "new.log"
    replacement.write_text("fresh 1\nfresh 2\nfresh 3\n")
    os.replace(replacement, path)  # a new file under the same name
    assert out.new_lines() == ["fresh 1", "fresh 2", "fresh 3"]


def punch_head(path, length: int) -> None:
    """What the core's log keeper does on tmpfs/btrfs: the head becomes a hole, size kept."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_WRONLY)
    try:
        punch_hole_keep_size = 0x02 | 0x01
        if libc.fallocate(fd, punch_hole_keep_size, 0, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


@pytest.fixture
def shm_dir():
    """A tmpfs dir, where punching a hole works (as on the cores' default work root)."""
    if not os.access("/dev/shm", os.W_OK):
        pytest.fail("the tests need a writable /dev/shm")
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="soaf-tail-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_punched_head_is_skipped_and_never_read_as_nul_bytes(shm_dir):
    path = shm_dir / "stdout.log"
    path.write_bytes(b"".join(b"line %05d %s\n" % (i, b"x" * 40) for i in range(4000)))
    cut = 128 * 1024  # whole blocks, mid-line, as the keeper cuts
    punch_head(path, cut)
    assert path.read_bytes()[:cut] == b"\0" * cut and path.stat().st_size > cut
    every = OutputFile(path).tail(None)
    assert every and not any("\0" in line for line in every)
    assert every[-1] == "line 03999 " + "x" * 40
    assert len(every) < 4000  # the head is gone
    assert OutputFile(path).tail(10_000) == every  # more lines asked than the file has
    assert OutputFile(path).tail(2)[-1] == every[-1]
    follow = OutputFile(path)
    assert follow.new_lines() == every
    with open(path, "ab") as f:
        f.write(b"after\n")
    assert follow.new_lines() == ["after"]


def test_leading_nul_bytes_are_dropped_where_holes_cannot_be_seen(tmp_path):
    path = tmp_path / "stdout.log"
    path.write_bytes(b"\0" * 5000 + b"half a line\n" + b"\0\0\n" + b"whole\n\nend\n")
    assert OutputFile(path).tail(None) == ["half a line", "whole", "", "end"]
    assert OutputFile(path).tail(100) == ["half a line", "whole", "", "end"]
    assert OutputFile(path).new_lines(final=True) == ["half a line", "whole", "", "end"]
