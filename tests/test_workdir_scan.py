"""One walk of a work dir gives its files (as ``list_files``), every directory and their
modification times, each read before the directory was listed."""

from __future__ import annotations

import os

from soaf.data.workdir import list_files, scan
from soaf.run.callbacks import DirSignature


def tree(root):
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "top.txt").write_text("x")
    (root / "a" / "one.txt").write_text("x")
    (root / "a" / "b" / "two.txt").write_text("x")
    os.symlink(root / "a", root / "link-to-dir")
    os.symlink(root / "top.txt", root / "link-to-file")
    os.symlink(root / "nowhere", root / "broken")


def test_scan_lists_what_list_files_lists_and_every_directory(tmp_path):
    tree(tmp_path)
    dirs, mtimes, files = scan(str(tmp_path))
    assert files == list_files(tmp_path)
    assert files == ["a/b/two.txt", "a/one.txt", "broken", "link-to-file", "top.txt"]
    assert sorted(dirs) == sorted(p for p, _d, _f in os.walk(tmp_path))
    assert mtimes == [os.stat(d).st_mtime_ns for d in dirs]


def test_scan_of_a_missing_dir_watches_it_as_missing(tmp_path):
    assert scan(str(tmp_path / "gone")) == ([str(tmp_path / "gone")], [-1], [])


def test_watch_all_returns_the_files_and_notices_a_new_entry_anywhere(tmp_path):
    tree(tmp_path)
    signature = DirSignature(str(tmp_path))
    assert signature.watch_all() == list_files(tmp_path)
    assert not signature.changed()
    os.utime(tmp_path / "empty", ns=(1, 1))  # as a new entry in it moves its time
    assert signature.changed()
