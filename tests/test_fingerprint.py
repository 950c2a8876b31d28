"""Fingerprints of inputs for the result cache, on real files and a real HTTP server."""

from __future__ import annotations

import os
import time

import fsspec
import pytest

from soaf.data.fingerprint import exists, fingerprint
from soaf.errors import FetchError
from tests.dataservers import http_files, served  # noqa: F401  (fixtures)


def fp(source, resolve=None):
    return fingerprint(str(source), resolve=resolve, timeout=10)


def test_local_files_and_trees_by_content(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same")
    b.write_text("same")
    assert fp(a) == fp(b) == fp(f"file://{b}")
    b.write_text("other")
    assert fp(a) != fp(b)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "x").write_text("x")
    before = fp(tree)
    assert before["sha256"].startswith("tree:")
    (tree / "sub" / "y").write_text("")  # a new empty file changes the tree
    assert fp(tree) != before
    with pytest.raises(FetchError, match="cannot fingerprint"):
        fp(tmp_path / "missing")


def test_a_reference_is_its_resolved_file(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("same")
    assert fp("soaf://abc/a.txt", resolve=lambda ref: a) == fp(a)
    with pytest.raises(FetchError, match="cannot be resolved"):
        fp("soaf://abc/a.txt")


def test_http_by_last_modified_and_size(http_files, served):
    url = http_files.url("a.txt")
    first = fp(url)
    assert first["url"] == url and first["last-modified"] and first["size"] == "17"
    assert fp(url) == first
    later = time.time() + 10
    os.utime(served / "a.txt", (later, later))
    assert fp(url) != first
    assert exists(url, timeout=5) and not exists(http_files.url("nope"), timeout=5)


def test_a_store_without_versions_is_hashed():
    fs = fsspec.filesystem("memory")
    fs.pipe("/fp/a.bin", b"one")
    first = fp("memory://fp/a.bin")
    assert set(first) == {"sha256"}
    fs.pipe("/fp/a.bin", b"two")
    assert fp("memory://fp/a.bin") != first
    assert exists("memory://fp/a.bin", timeout=5) and not exists("memory://fp/no", timeout=5)
