"""Staging: moving a template's inputs into a work dir, from a local path or any URL.

Local files and directories are copied, hard-linked or symlinked (``input_mode``), never
moved. ``http(s)`` is fetched with the standard library (no extra dependency, and a body
shorter than its Content-Length is caught); every other scheme goes through fsspec
(``ftp://`` built in; ``s3://``, ``sftp://``, ``gs://`` ... with the fsspec extra the user
installs). Whatever the source, the data lands under a temporary name first and is
renamed into place only when complete, so a partial download never looks complete.
Any failure becomes a ``FetchError`` naming the source (without its password) and why.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaf.config import DEFAULT_FETCH_TIMEOUT, host_name
from soaf.data.cloning import clone
from soaf.data.transfer import CHUNK, Stop, check_stop, chunks, copy_file
from soaf.data.workdir import confine
from soaf.errors import FetchError, TransferStopped, ValidationError
from soaf.protocol.template import REF_SCHEME, ServiceParamTemplate, check_relative, is_url

log = logging.getLogger(__name__)

#: Resolves a ``soaf://`` reference to a local path (same host) or a URL.
Resolver = Callable[[str], "Path | str"]


@dataclass
class StageContext:
    """What staging needs from the core; a program used on its own gets the defaults.

    ``resolve`` is set by the core: references to other services' outputs can only be
    resolved where their records can be read. ``stop`` is the core's "this run is
    cancelled or the core stops": staging and collection check it between chunks and
    stop (``TransferStopped``) instead of writing on after the service has ended.
    """

    timeout: float = DEFAULT_FETCH_TIMEOUT
    resolve: Resolver | None = None
    stop: Stop | None = None


@dataclass
class Staged:
    """One staged input, as recorded on the service record under ``inputs``."""

    name: str
    source: str
    size: int
    files: int
    mode: str  # copy | link | reflink | symlink | download
    extra: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "size": self.size,
                "files": self.files, "mode": self.mode, **self.extra}


# -- URLs ---------------------------------------------------------------------------------


def redact(url: str) -> str:
    """``url`` without its password (``ftp://user@host/x``), fit for records and logs."""
    if not is_url(url):
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = urllib.parse.quote(parts.username or "", safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host))


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if is_url(url) else ""


def local_path(source: str) -> Path:
    """The path a local source (plain path or ``file://`` URL) names."""
    if scheme(source) == "file":
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(source).path))
    return Path(source).expanduser()


def open_fs(url: str, *, timeout: float = DEFAULT_FETCH_TIMEOUT) -> tuple[Any, str]:
    """An fsspec file system and the path inside it for ``url``.

    A fresh instance per call (no fsspec instance cache): a long-running core must not
    reuse an FTP connection the server closed hours ago.
    """
    import fsspec

    options: dict[str, Any] = {"skip_instance_cache": True}
    if scheme(url) in ("ftp", "sftp", "ssh"):
        options["timeout"] = timeout
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        raise ImportError(f"the {scheme(url)!r} scheme needs an extra package: {e}") from e
    except ValueError as e:
        if "Protocol not known" in str(e):
            raise ValueError(f"no fsspec implementation for {scheme(url)!r} URLs") from e
        raise
    return fs, str(path)


# -- writing into a work dir ------------------------------------------------------------


def leaf_target(work_dir: Path, name: str, *, field_name: str = "input_files") -> Path:
    """Where ``name`` goes in ``work_dir``: its parent must stay inside (symlinks followed),
    the leaf itself is not followed, so an earlier attempt's symlink is replaced, not used."""
    check_relative(field_name, name)
    parent, leaf = posixpath.split(posixpath.normpath(name))
    base = work_dir.resolve() if parent in ("", ".") else confine(work_dir, parent, field=field_name)
    if leaf in ("", ".", ".."):
        raise ValidationError(field_name, f"{name!r} names no file")
    return base / leaf


def temp_name(target: Path) -> Path:
    """A fresh hidden name beside ``target``; never mistaken for the finished file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)
    return Path(tmp)


def remove(path: Path) -> None:
    """Remove a file, symlink or directory tree at ``path`` (never following a symlink)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def install(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``, replacing what an earlier attempt left."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif tmp.is_dir() and not tmp.is_symlink() and (target.exists() or target.is_symlink()):
        target.unlink()  # a directory cannot be renamed over a file
    os.replace(tmp, target)


def measure(path: Path) -> tuple[int, int]:
    """(bytes, files) of a staged file or tree, following a top-level symlink."""
    if path.is_dir():
        size = files = 0
        for dirpath, _dirs, names in os.walk(path):
            for name in names:
                try:
                    size += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
                files += 1
        return size, files
    return path.stat().st_size, 1


# -- local sources ----------------------------------------------------------------------


def _hard_link_tree(source: Path, tmp: Path, *, fallback: Callable[[str, str], Any]) -> bool:
    """Hard-link ``source`` (file or tree) to ``tmp``; True if every file was linked,
    False if some went through ``fallback`` (another file system, no permission)."""
    linked = [True]

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
                raise
            linked[0] = False
            fallback(src, dst)

    if source.is_dir():
        shutil.copytree(source, tmp, copy_function=link)
    else:
        link(str(source), str(tmp))
    return linked[0]


def stage_local(source: Path, tmp: Path, mode: str, *, stop: Stop | None = None) -> str:
    """Put ``source`` at ``tmp`` by ``mode``; returns the mode actually used."""
    if mode == "symlink":
        os.symlink(source.resolve(), tmp, target_is_directory=source.is_dir())
        return "symlink"

    def copy(src: str, dst: str) -> None:
        copy_file(src, dst, stop=stop)
        shutil.copystat(src, dst)

    if mode == "link":
        return "link" if _hard_link_tree(source, tmp, fallback=copy) else "copy"
    if source.is_dir():
        shutil.copytree(source, tmp, copy_function=copy)
    else:
        copy(str(source), str(tmp))
    return "copy"


def link_reference(source: Path, tmp: Path, *, stop: Stop | None = None) -> str:
    """Hand another service's output over without copying where the file systems allow:
    a reflink, else a read-only hard link (both survive the producer's work dir being
    recycled), else a copy (see ``soaf.data.cloning``)."""

    def copy(src: str, dst: str) -> None:
        copy_file(src, dst, stop=stop)
        shutil.copystat(src, dst)

    return clone(source, tmp, copy=copy)


# -- remote sources ---------------------------------------------------------------------


def fetch_http(url: str, tmp: Path, *, timeout: float, stop: Stop | None = None) -> None:
    """Download ``url`` to ``tmp``; a body shorter than its Content-Length is an error.
    Reads what has arrived (``read1``), so a slow server cannot keep a stopped fetch
    writing for long."""
    request = urllib.request.Request(url, headers={"User-Agent": "soaf"})
    with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "wb") as out:
        expected = resp.headers.get("Content-Length")
        got = 0
        while True:
            check_stop(stop)
            chunk = resp.read1(CHUNK)
            if not chunk:
                break
            check_stop(stop)
            out.write(chunk)
            got += len(chunk)
    if expected is not None and expected.isdigit() and got != int(expected):
        raise OSError(f"connection closed after {got} of {expected} bytes")


def fetch_fsspec(url: str, tmp: Path, *, timeout: float, stop: Stop | None = None) -> None:
    """Copy the file or directory tree at ``url`` to ``tmp`` through fsspec, by chunks."""
    fs, path = open_fs(url, timeout=timeout)
    if fs.isdir(path):
        tmp.mkdir()
        root = path.rstrip("/")
        for remote in fs.find(path):
            rel = posixpath.relpath(remote, root)
            if rel.startswith("..") or posixpath.isabs(rel):
                continue
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            _get_file(fs, remote, local, stop)
        return
    _get_file(fs, path, tmp, stop)


def _get_file(fs: Any, remote: str, local: Path, stop: Stop | None) -> None:
    expected = fs.info(remote).get("size")  # FileNotFoundError when there is nothing
    check_stop(stop)
    with fs.open(remote, "rb") as src, open(local, "wb") as out:
        for chunk in chunks(src, stop):
            out.write(chunk)
    got = local.stat().st_size
    if isinstance(expected, int) and got != expected:
        raise OSError(f"transfer of {remote} stopped after {got} of {expected} bytes")


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        return str(reason.strerror if isinstance(reason, OSError) and reason.strerror else reason)
    if isinstance(error, FileNotFoundError):
        return "not found"
    if isinstance(error, TimeoutError):
        return "timed out"
    text = str(error) or type(error).__name__
    return text if isinstance(error, OSError) else f"{type(error).__name__}: {text}"


# -- the whole step ---------------------------------------------------------------------


def stage(source: str, work_dir: Path, name: str, *, mode: str = "copy",
          context: StageContext | None = None) -> Staged:
    """Stage one ``source`` as ``name`` inside ``work_dir``; FetchError when it cannot."""
    context = context or StageContext()
    shown = redact(source)
    target = leaf_target(work_dir, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    origin = source
    try:
        if source.startswith(REF_SCHEME):
            if context.resolve is None:
                raise FetchError(shown, "references to outputs are resolved by a core only")
            resolved = context.resolve(source)
            if isinstance(resolved, Path):
                used = link_reference(resolved, tmp, stop=context.stop)
                origin = str(resolved)
            else:
                origin = resolved
                _fetch_url(resolved, tmp, context)
                used = "download"
        elif is_url(source) and scheme(source) != "file":
            _fetch_url(source, tmp, context)
            used = "download"
        else:
            path = local_path(source)
            if not path.exists():
                raise FetchError(shown, f"no such file or directory on {host_name()}")
            used = stage_local(path, tmp, mode, stop=context.stop)
        check_stop(context.stop)
        install(tmp, target)
    except (FetchError, TransferStopped):
        _discard(tmp)
        raise
    except Exception as e:
        _discard(tmp)
        reason = _reason(e)
        if origin != source:
            reason = f"{redact(origin)}: {reason}"
        raise FetchError(shown, reason) from e
    except BaseException:
        _discard(tmp)
        raise
    size, files = measure(target)
    staged = Staged(name, shown, size, files, used)
    if origin != source:
        staged.extra["resolved"] = redact(origin)
    log.debug("staged %s as %s (%d bytes, %s)", shown, target, size, used)
    return staged


def _fetch_url(url: str, tmp: Path, context: StageContext) -> None:
    if scheme(url) in ("http", "https"):
        fetch_http(url, tmp, timeout=context.timeout, stop=context.stop)
    else:
        fetch_fsspec(url, tmp, timeout=context.timeout, stop=context.stop)


def _discard(tmp: Path) -> None:
    try:
        remove(tmp)
    except OSError:
        log.warning("could not remove the partial %s", tmp, exc_info=True)


def stage_inputs(template: ServiceParamTemplate, work_dir: Path,
                 context: StageContext | None = None) -> list[Staged]:
    """Stage every entry of ``template.input_files``, in order; the first failure stops."""
    mode = getattr(template, "input_mode", "copy")
    staged = []
    for name, source in template.input_sources().items():
        check_stop(context.stop if context else None)
        staged.append(stage(source, work_dir, name, mode=mode, context=context))
    return staged
