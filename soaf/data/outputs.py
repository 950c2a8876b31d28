"""Collecting results: check a work dir against ``output_files``, checksum, copy to a target.

``collect_outputs`` expands the template's patterns (globs allowed; a match that is a
directory stands for every file below it) and fails with ``MissingOutputError`` listing
each required pattern that matched nothing; ``optional_outputs`` are taken when present.
``upload_outputs`` copies the collected files to ``output_target``: a directory on the
core's machine, or any URL fsspec can write. Each file is written under a temporary name
and renamed where the target can rename, so a half-copied result never looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soaf.config import DEFAULT_FETCH_TIMEOUT
from soaf.data.staging import (
    install,
    local_path,
    open_fs,
    redact,
    scheme,
    temp_name,
)
from soaf.errors import MissingOutputError, UploadError
from soaf.protocol.template import ServiceParamTemplate, is_url

log = logging.getLogger(__name__)

#: fsspec protocols whose ``mv`` is a cheap rename: uploads there go through a temp name.
#: (On object stores a move is a second full copy, so files are written in place.)
RENAMING_PROTOCOLS = frozenset({"file", "local", "ftp", "sftp", "ssh", "memory"})


@dataclass
class Output:
    """One collected output file, as recorded on the service record under ``outputs``."""

    name: str
    size: int
    sha256: str
    url: str | None = None

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "size": self.size, "sha256": self.sha256}
        if self.url is not None:
            out["url"] = self.url
        return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1024 * 1024)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def _matches(work_dir: Path, pattern: str) -> list[str]:
    """Files (relative names) that ``pattern`` stands for, inside ``work_dir`` only."""
    root = work_dir.resolve()
    found: set[str] = set()
    for match in root.glob(pattern):
        real = match.resolve()
        if real != root and root not in real.parents:
            log.warning("output %s leaves the work dir (-> %s); not collected", match, real)
            continue
        if match.is_dir():
            for dirpath, _dirs, names in os.walk(match):
                for name in names:
                    found.add(os.path.relpath(os.path.join(dirpath, name), root))
        elif match.is_file():
            found.add(match.relative_to(root).as_posix())
    return sorted(found)


def collect_outputs(work_dir: Path, required: list[str] | tuple[str, ...],
                    optional: list[str] | tuple[str, ...] = ()) -> list[Output]:
    """Every file the patterns name, with its size and sha256; MissingOutputError if a
    required pattern matched nothing."""
    names: dict[str, None] = {}
    missing: list[str] = []
    for pattern in required:
        matched = _matches(work_dir, pattern)
        if not matched:
            missing.append(pattern)
        names.update(dict.fromkeys(matched))
    if missing:
        raise MissingOutputError(missing)
    for pattern in optional:
        names.update(dict.fromkeys(_matches(work_dir, pattern)))
    root = work_dir.resolve()
    outputs = []
    for name in sorted(names):
        path = root / name
        outputs.append(Output(name, path.stat().st_size, sha256_of(path)))
    return outputs


def expand_target(target: str, template: ServiceParamTemplate) -> str:
    """``output_target`` with ``{service_id}`` and ``{service}`` filled in."""
    return target.replace("{service_id}", template.service_id).replace(
        "{service}", template.service
    )


def upload_outputs(work_dir: Path, outputs: list[Output], target: str, *,
                   timeout: float = DEFAULT_FETCH_TIMEOUT) -> None:
    """Copy each output to ``target`` (same relative names); sets each ``url``."""
    root = work_dir.resolve()
    try:
        if not is_url(target) or scheme(target) == "file":
            _copy_to_dir(root, outputs, local_path(target))
        else:
            _put_to_fs(root, outputs, target, timeout=timeout)
    except UploadError:
        raise
    except Exception as e:
        text = str(e) or type(e).__name__
        raise UploadError(f"cannot copy outputs to {redact(target)}: {text}") from e
    shown = redact(target).rstrip("/")
    for output in outputs:
        output.url = f"{shown}/{output.name}"


def _copy_to_dir(root: Path, outputs: list[Output], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    base = directory.resolve()
    for output in outputs:
        destination = base / output.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(destination)
        try:
            shutil.copyfile(root / output.name, tmp)
            install(tmp, destination)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        log.debug("copied output %s to %s", output.name, destination)


def _put_to_fs(root: Path, outputs: list[Output], target: str, *, timeout: float) -> None:
    fs, base = open_fs(target, timeout=timeout)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    renames = any(p in RENAMING_PROTOCOLS for p in protocols)
    base = base.rstrip("/")
    made: set[str] = set()
    for output in outputs:
        remote = posixpath.join(base, output.name)
        parent = posixpath.dirname(remote)
        if parent and parent not in made:
            fs.makedirs(parent, exist_ok=True)
            made.add(parent)
        if renames:
            tmp = posixpath.join(parent, f".{posixpath.basename(remote)}.{os.getpid()}.part")
            fs.put_file(str(root / output.name), tmp)
            if fs.exists(remote):
                fs.rm_file(remote)
            fs.mv(tmp, remote)
        else:
            fs.put_file(str(root / output.name), remote)
        log.debug("uploaded output %s to %s", output.name, redact(target))
