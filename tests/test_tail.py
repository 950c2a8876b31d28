"""OutputFile: the last lines of a program's output, then what it appends."""

from __future__ import annotations

import os

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
