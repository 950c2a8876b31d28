"""Cloning another service's output into a work dir: reflink, read-only hard link, copy."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from soaf.data.cloning import clone
from soaf.data.staging import link_reference


@pytest.fixture
def shm() -> Iterator[Path]:
    """A directory on /dev/shm that any user may enter (tmpfs: no reflinks)."""
    path = Path(tempfile.mkdtemp(prefix="soaf-clone-", dir="/dev/shm"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_same_file_system_links_read_only(shm):
    src = shm / "big.bin"
    src.write_bytes(b"x" * 4096)
    src.chmod(0o644)
    assert link_reference(src, shm / "in.bin") == "link"
    assert os.stat(src).st_ino == os.stat(shm / "in.bin").st_ino
    assert stat.S_IMODE(os.stat(shm / "in.bin").st_mode) == 0o444  # the shared inode
    # A program that is not root cannot write the producer's output through its link.
    if os.geteuid() == 0:
        done = subprocess.run(["sh", "-c", 'echo x >> "$0"', str(shm / "in.bin")],
                              user=65534, capture_output=True, timeout=30)
        assert done.returncode != 0 and b"ermission denied" in done.stderr
    assert src.read_bytes() == b"x" * 4096


def test_across_file_systems_copies(shm, tmp_path):
    tree = tmp_path / "tree"  # on the main disk; the target is on tmpfs
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("a")
    (tree / "sub" / "b.txt").write_text("b")
    if os.stat(tree).st_dev == os.stat(shm).st_dev:
        pytest.fail("/dev/shm and the test's tmp dir are one file system here")
    assert clone(tree, shm / "tree", copy=shutil.copy2) == "copy"
    assert (shm / "tree" / "sub" / "b.txt").read_text() == "b"
    assert os.stat(tree / "a.txt").st_ino != os.stat(shm / "tree" / "a.txt").st_ino
    assert os.access(shm / "tree" / "a.txt", os.W_OK)  # a private copy stays writable
    assert stat.S_IMODE(os.stat(tree / "a.txt").st_mode) & 0o200  # the original untouched


def test_a_tree_reports_the_weakest_mode(shm):
    (shm / "t").mkdir()
    (shm / "t" / "a.txt").write_text("a")
    assert clone(shm / "t", shm / "u", copy=shutil.copy2) == "link"
    assert (shm / "u" / "a.txt").read_text() == "a"
