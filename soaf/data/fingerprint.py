"""Fingerprints: what identifies an input's content without staging it (the result cache).

The result cache (docs/cache.md) answers a template from an earlier run only when the
inputs hold the same content. Each input gets a fingerprint, a small JSON-able dict:

* a local file: its SHA-256; a directory: the SHA-256 over its files' relative names
  and contents (symlinks by their target text, as staging copies them);
* a URL whose server or store gives an ETag or a modification time: the URL (without
  its password) with the ETag, the modification time and the size, so a changed
  object gives another fingerprint without being downloaded;
* any other URL: the SHA-256 of its content, fetched through memory (never to disk);
* a ``soaf://`` reference: the fingerprint of the file it resolves to (a producer's
  output on this host, or its uploaded copy).

``exists`` tells whether an earlier run's output is still where its record says.
Nothing here knows Redis: references are resolved by the caller's ``resolve``.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from soaf.data.staging import Resolver, local_path, open_fs, redact, scheme
from soaf.data.transfer import CHUNK
from soaf.errors import FetchError
from soaf.protocol.template import REF_SCHEME, is_url

#: Metadata keys stores use for an object's version, most telling first.
_VERSION_KEYS = ("ETag", "etag", "e_tag", "LastModified", "last_modified", "mtime", "updated",
                 "Last-Modified")


def fingerprint(source: str, *, resolve: Resolver | None, timeout: float) -> dict[str, Any]:
    """The fingerprint of one input ``source``; FetchError when it cannot be read."""
    try:
        if source.startswith(REF_SCHEME):
            if resolve is None:
                raise FetchError(source, "references cannot be resolved here")
            where = resolve(source)
            return fingerprint(str(where), resolve=None, timeout=timeout)
        if not is_url(source) or scheme(source) == "file":
            return {"sha256": _local_digest(local_path(source))}
        if scheme(source) in ("http", "https"):
            return _http(source, timeout)
        return _fsspec(source, timeout)
    except FetchError:
        raise
    except (OSError, ValueError, ImportError, urllib.error.URLError) as e:
        raise FetchError(redact(source), f"cannot fingerprint it: {e}") from e


def exists(where: str | Path, *, timeout: float) -> bool:
    """Whether a local path or a URL names something that is there now."""
    text = str(where)
    try:
        if not is_url(text) or scheme(text) == "file":
            return local_path(text).exists()
        if scheme(text) in ("http", "https"):
            request = urllib.request.Request(text, method="HEAD", headers={"User-Agent": "soaf"})
            with urllib.request.urlopen(request, timeout=timeout):
                return True
        fs, path = open_fs(text, timeout=timeout)
        return bool(fs.exists(path))
    except (OSError, ValueError, ImportError, urllib.error.URLError):
        return False


def _local_digest(path: Path) -> str:
    digest = hashlib.sha256()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(root) / name
                rel = str(full.relative_to(path)).encode()
                digest.update(rel + b"\0" + _file_or_link(full).encode() + b"\0")
        return "tree:" + digest.hexdigest()
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    return _file_or_link(path)


def _file_or_link(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "link:" + os.readlink(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _http(url: str, timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "soaf"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            headers = {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as e:
        if e.code not in (405, 501):  # a server that knows no HEAD: fetch it instead
            raise
        headers = {}
    version = {k: headers[k] for k in ("etag", "last-modified") if headers.get(k)}
    if version:
        return {"url": redact(url), **version, "size": headers.get("content-length")}
    request = urllib.request.Request(url, headers={"User-Agent": "soaf"})
    digest = hashlib.sha256()
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        while chunk := resp.read(CHUNK):
            digest.update(chunk)
    return {"sha256": digest.hexdigest()}


def _fsspec(url: str, timeout: float) -> dict[str, Any]:
    fs, path = open_fs(url, timeout=timeout)
    info = fs.info(path)
    version = {k: str(info[k]) for k in _VERSION_KEYS if info.get(k) not in (None, "")}
    if version and info.get("type") != "directory":
        return {"url": redact(url), **version, "size": info.get("size")}
    digest = hashlib.sha256()
    for name in sorted(fs.find(path)) if info.get("type") == "directory" else [path]:
        digest.update(str(name).encode() + b"\0")
        with fs.open(name, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return {"sha256": digest.hexdigest()}
